"""torch.distributed set-up for training under torchrun: DDP by default, FSDP2 on request.

`torchrun --nproc_per_node N -m llamavit.cli train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them training runs in one process and nothing here initialises a process group. The backend is NCCL
on GPUs and gloo on CPUs. Every rank sees the same global batch order; rank r trains on its slice of
each global batch, so N processes with per-rank batch B/N follow the same loss curve as one process
with batch B.
"""
import functools
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..layers import Block
from ..models.dit_llama import AdaLNBlock


@dataclass
class DistEnv:
    """This process's place in a torchrun job (one process: rank 0 of 1) and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU when CUDA is available, else the CPU; 'cpu' / 'cuda' force it."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available on this machine")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16); True where it cannot be told
    (no /proc/cpuinfo). Without them bf16 autocast runs several times slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def bf16_speedup(device_type: str = "cpu", size: int = 512, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a size^3 matmul on this device (best of `repeats`), measured once per process:
    > 1 when bf16 autocast can pay off. Where bf16 has no fast kernels (CPUs without AVX512-BF16 / AMX) it is
    several times below 1."""
    if device_type != "cpu":
        return float("inf")   # accelerators: bf16 is their fast path
    a = torch.randn(size, size)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        torch.mm(x, x)   # warm-up: the first call pays for kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(x, x)
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-12)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group (idempotent) when torchrun started this process, also as its only process
    (`--nproc_per_node 1`: a one-GPU DDP / FSDP run); return this process's place in it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    under_torchrun = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if under_torchrun and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown_distributed(finished: bool = False) -> None:
    """Leave the process group. finished: every rank completed its work, so wait for all of them first (a rank
    that leaves while another is still in a collective makes gloo abort that one); after an error, leave at once."""
    if dist.is_initialized():
        try:
            if finished:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a float64 tensor over ranks (a copy; unchanged in one process)."""
    if not env.distributed:
        return values
    out = values.to(env.device if env.device.type == "cuda" else "cpu", torch.float64).clone()
    dist.all_reduce(out)
    return out.cpu()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (a no-op in one process)."""
    if env.distributed:
        dist.barrier()


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """The module the training step calls: DDP around `model`, or `model` itself sharded in place by FSDP2
    (`fully_shard` on every transformer block, then the root), or `model` unchanged in a process outside torchrun.
    Every trainable parameter must get a gradient (objectives freeze the trunk parts they do not reach)."""
    if not dist.is_initialized():
        if fsdp:
            raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N")
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        # our modules return Linear outputs (views of a 2D matmul) and never change them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in _transformer_blocks(model):
            fully_shard(block)
        return fully_shard(model)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _transformer_blocks(model: nn.Module):
    """The FSDP units: every transformer block (the one Block of every trunk and decoder, DiT's adaLN block)
    that trains; frozen blocks (a frozen LLM) stay with the root."""
    for module in model.modules():
        if isinstance(module, (Block, AdaLNBlock)) and any(p.requires_grad for p in module.parameters()):
            yield module


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer):
    """(model, optimizer) state dicts in full on CPU, the optimizer state keyed by parameter name: the
    same files whatever the world size and whether FSDP sharded the model (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: Optional[dict],
                          optim_sd: dict) -> None:
    """Load full state dicts (from `full_state_dicts`) into a possibly sharded model and its optimizer;
    model_sd None leaves the model as it is (loaded elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True)
    if model_sd is not None:
        set_model_state_dict(model, model_sd, options=opts)
    if optim_sd.get("state") and all(isinstance(k, int) for k in optim_sd["state"]):
        optimizer.load_state_dict(optim_sd)   # older checkpoints: state keyed by parameter index
    else:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
