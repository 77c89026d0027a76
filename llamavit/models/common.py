"""Plumbing shared by llamavit's classifiers: timm's model contract, the plain-trunk forward, the timm ViT init.

`ClassifierContract` is a mixin for nn.Module classifiers that hold `self.head` (nn.Linear or
nn.Identity), `self.embed_dim`, `self.num_classes`, `self.global_pool` and `self.grad_checkpointing`.
A model whose pooling choices differ overrides `check_global_pool`; one whose head is not a plain
Linear (AIM's attentive probe) overrides `get_classifier` and `reset_classifier`.

`TokenTrunk` is the forward of every plain (single-scale) trunk: embed -> blocks -> finish, with
`forward_features`, `forward_intermediates` and `prune_intermediate_layers` written once.
"""
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices

from ..layers import iter_blocks


class ClassifierContract:
    """set_grad_checkpointing, get_classifier, reset_classifier, head_hidden_size as timm models have them."""

    @property
    def head_hidden_size(self) -> int:
        """Width of the pre-logits vector (what forward_head(..., pre_logits=True) returns)."""
        return self.num_features

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier for num_classes (0: no classifier, forward returns the pooled features)."""
        if global_pool is not None:
            self.check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = self.head.weight if isinstance(self.head, nn.Linear) else next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity()).train(self.training)

    def check_global_pool(self, global_pool: str) -> None:
        """Raise ValueError when this model cannot pool that way."""
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """timm's parameter groups (for `layer_decay`): the embedding stem, one group per block, the rest last."""
        blocks = self.blocks_pattern if coarse else [(self.blocks_pattern, None), (r"^norm|^fc_norm", (99999,))]
        return {"stem": self.stem_pattern, "blocks": blocks}

    stem_pattern = r"^cls_token|^pos_embed|^patch_embed"
    blocks_pattern = r"^blocks\.(\d+)"


class TokenTrunk:
    """The forward of a plain trunk: one token sequence through `trunk_blocks()`.

    A model implements `embed(x, attn_mask) -> (tokens (B, N, D), attn_args, grid)` (patch embedding,
    extra tokens, positions, RoPE tables, the mask) and may override `final_layers()` (the block
    outputs its features are made of; default the last) and `finish(outputs, attn_mask)` (default: the
    final norm of the last output). `num_prefix_tokens` / `num_suffix_tokens` count the extra tokens before / after
    the patches; `forward_intermediates` drops them and returns patch maps.
    """

    num_suffix_tokens = 0

    def trunk_blocks(self) -> nn.ModuleList:
        """The blocks the tokens go through, in order."""
        return self.blocks

    def final_layers(self) -> Tuple[int, ...]:
        """The block indices forward_features is made of (default: the last)."""
        return (len(self.trunk_blocks()) - 1,)

    def finish(self, outputs: Dict[int, torch.Tensor], attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Block outputs {index: (B, N, D)} of final_layers() -> forward_features' tokens (B, N, D)."""
        return self.norm(outputs[max(outputs)])

    def intermediate_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The norm forward_intermediates(norm=True) applies: (B, N, D) -> (B, N, D)."""
        return self.norm(tokens)

    def run_trunk(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], keep: Set[int],
                  last: int) -> Tuple[Dict[int, torch.Tensor], Tuple[int, int]]:
        """Embed images (B, C, H, W) and run blocks 0..last; -> ({index: output (B, N, D)} for `keep`, grid)."""
        tokens, attn_args, grid = self.embed(x, attn_mask)
        checkpointing = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        outputs = iter_blocks(self.trunk_blocks()[:last + 1], tokens, checkpointing, **attn_args)
        del tokens   # the blocks own the first activation now: a reference here would keep it alive
        kept = {}
        for i, out in enumerate(outputs):
            if i in keep:
                kept[i] = out
            del out
        return kept, grid

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, N, D) (see the model's docstring for which).

        attn_mask: boolean, True = may attend, (N, N) or (B, 1, N, N) over all N tokens, in every block.
        """
        layers = self.final_layers()
        return self.finish(self.run_trunk(x, attn_mask, set(layers), max(layers))[0], attn_mask)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, attn_mask: Optional[torch.Tensor] = None):
        """timm's feature API: block outputs as patch maps (B, D, H/p, W/p) ('NCHW') or (B, P, D) ('NLC'),
        extra tokens dropped; `norm` applies the final norm to each.

        indices: the last n blocks if an int, all if None, else the listed block indices. Returns the list
        (intermediates_only; blocks after the last taken one are skipped), else (forward_features, list).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.trunk_blocks()), indices)
        final = () if intermediates_only else self.final_layers()
        last = max_index if intermediates_only or stop_early else len(self.trunk_blocks()) - 1
        kept, (gh, gw) = self.run_trunk(x, attn_mask, set(take) | set(final), max((last, *final)))
        intermediates = []
        for i in take:
            y = self.intermediate_norm(kept[i]) if norm else kept[i]
            y = y[:, self.num_prefix_tokens:y.shape[1] - self.num_suffix_tokens]
            intermediates.append(y.transpose(1, 2).reshape(y.shape[0], -1, gh, gw) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.finish({i: kept[i] for i in final}, attn_mask), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last index taken (and the final norm / the head); -> the taken indices."""
        take, max_index = feature_take_indices(len(self.trunk_blocks()), indices)
        self.prune_blocks(max_index + 1)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def prune_blocks(self, keep: int) -> None:
        """Keep the first `keep` blocks."""
        self.blocks = self.blocks[:keep]

    def patch_grid(self, x: torch.Tensor) -> Tuple[int, int]:
        """The patch grid (rows, cols) of images x (B, C, H, W)."""
        ph, pw = self.patch_embed.patch_size
        return x.shape[-2] // ph, x.shape[-1] // pw

    def feature_info_of(self, blocks: Sequence, reduction: int) -> List[dict]:
        """timm's feature_info: one entry per block, its width and stride."""
        return [{"num_chs": self.embed_dim, "reduction": reduction, "module": f"blocks.{i}"}
                for i in range(len(blocks))]


def init_linear(m: nn.Module) -> None:
    """timm ViT's init for `model.apply`: Linear weights truncated normal (std 0.02), biases zero."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
