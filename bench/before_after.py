"""llamavit now vs an earlier commit, side by side in ONE process: eval throughput, and (--training) the
loss curves of every trainer from the same seed.

The earlier commit's `llamavit/` is extracted with `git archive` into a temporary directory as the
package `llamavit_ref` (the package imports itself relatively, so it runs under another name). For each
model both versions are built from the same seed (the same weights: checked, and the outputs compared),
then timed in interleaved rounds under `torch.inference_mode`, fp32, eval, the order alternating (A B, B A,
...) so that neither side always runs on the heap the other just left; the ratio is the median of the
per-round ratios, with their quartiles. A refactor must be no slower: ratio ours / ref ~1 within the
quartiles (this machine's round-to-round noise is a few percent).

    python bench/before_after.py --ref a6438de                   # iLLaMA-T (soft mask r=0) and VisionLLaMA-S
    python bench/before_after.py --ref HEAD~3 --out bench/results/before_after.json
    python bench/before_after.py --ref a6438de --training        # + supervised, AIM, MAE, DiT: 8 steps each
    python bench/before_after.py --ref 16d40d2 --train-steps --models illama_small_patch16_224

--train-steps also times forward + backward (the path autograd takes; eval mode, so no dropout draws) in the same
alternating rounds, after checking that both versions give the same gradients; `--peers` (one timm name per
model) adds the timm peer to those rounds, so both versions' ratios to it come from one run.

    python bench/before_after.py --ref 16d40d2 --train-steps --models illama_tiny_patch16_224 \
        --peers deit_tiny_patch16_224

--training runs each trainer of both versions for a few steps on synthetic data (tiny models, the same
seed, one process) and compares the logged losses step by step: a refactor of the loop should leave them
equal (up to float rounding where an operation changed form).
"""
import argparse
import contextlib
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import timm
import torch
from timm.models import _registry as timm_registry

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from machine import cpu_flags, cpu_model  # noqa: E402

# NOTE: nothing here may import llamavit before the ref package is imported (throughput.py does): the package
# imported last owns the model names in timm's registry, and it must be the current one

MODELS = {"illama_tiny_patch16_224": {}, "visionllama_small_patch16_224": {}}
STEPS = 8
TINY_ILLAMA = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)
TINY_AIM = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, probe_layers=1)
TINY_VL = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, mlp_multiple_of=8, class_token=False,
               global_pool="avg")
TINY_DIT = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4)


def trainer_cases(ref, ours, out: str):
    """{name: (ref trainer factory, our trainer factory)}: the same run in both versions."""
    common = dict(data="synthetic", max_steps=STEPS, log_every=1, progress=False)
    sup = dict(model="illama_tiny_patch16_224", model_kwargs=TINY_ILLAMA, img_size=32, batch_size=16, epochs=2,
               soft_mask="linear", soft_mask_epochs=1.0, **common)
    aim = dict(model="aim_600m_patch14_224", model_kwargs=TINY_AIM, img_size=32, decoder_dim=32, decoder_depth=1,
               batch_size=16, epochs=2, **common)
    mae = dict(model="visionllama_small_patch16_224", model_kwargs=TINY_VL, img_size=16, in_chans=1, decoder_dim=32,
               decoder_depth=1, batch_size=16, epochs=2, scale=(0.2, 1.0), color_jitter_prob=0.0, **common)
    dit = dict(model="dit_llama_s_2", model_kwargs=TINY_DIT, img_size=16, batch_size=8, epochs=1, **common)
    rt, ot = ref.train, ours.train
    rpre = importlib.import_module("llamavit_ref.train.aim_pretrain")
    rmae = importlib.import_module("llamavit_ref.train.mae")
    rgen = importlib.import_module("llamavit_ref.train.generate")
    d = lambda name, side: os.path.join(out, f"{name}-{side}")   # noqa: E731
    return {
        "supervised": (lambda: rt.Trainer(rt.TrainConfig(output=d("sup", "ref"), **sup)),
                       lambda: ot.Trainer(ot.TrainConfig(output=d("sup", "ours"), **sup))),
        "pretrain_aim": (lambda: rpre.AIMPretrainer(rpre.PretrainConfig(output=d("aim", "ref"), **aim)),
                         lambda: ot.Pretrainer(ot.PretrainConfig(output=d("aim", "ours"), **aim))),
        "pretrain_mae": (lambda: rmae.MAEPretrainer(rpre.PretrainConfig(output=d("mae", "ref"), **mae)),
                         lambda: ot.Pretrainer(ot.PretrainConfig(output=d("mae", "ours"), objective="mae", **mae))),
        "generate_ddpm": (lambda: rgen.GenerativeTrainer(rgen.GenerateConfig(output=d("dit", "ref"), **dit)),
                          lambda: ot.GenerativeTrainer(ot.GenerateConfig(output=d("dit", "ours"), **dit))),
    }


@contextlib.contextmanager
def ref_models(ref_registry):
    """While inside: timm.create_model(<llamavit name>) builds the ref package's model (both packages register
    the same names with timm; the current one, imported last, owns them otherwise)."""
    saved = {n: timm_registry._model_entrypoints[n] for n in ref_registry.MODEL_FAMILY}
    for name in saved:
        timm_registry._model_entrypoints[name] = functools.partial(ref_registry._build, name)
    try:
        yield
    finally:
        timm_registry._model_entrypoints.update(saved)


def logged_losses(run_dir: str) -> list:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def compare_training(ref, ours, out: str) -> dict:
    """Per trainer: the max abs and relative difference of the logged losses over STEPS steps."""
    rows = {}
    for name, (make_ref, make_ours) in trainer_cases(ref, ours, out).items():
        curves = {}
        for side, make in (("ref", make_ref), ("ours", make_ours)):
            torch.manual_seed(0)
            with ref_models(ref.models.registry) if side == "ref" else contextlib.nullcontext():
                trainer = make()
                package = type(trainer.model).__module__.split(".")[0]
                if package != ("llamavit_ref" if side == "ref" else "llamavit"):
                    raise RuntimeError(f"the {side} trainer built a {package} model")
                trainer.fit()
            curves[side] = logged_losses(trainer.cfg.output)
        diffs = [abs(a - b) for a, b in zip(curves["ref"], curves["ours"])]
        rel = max(d / max(abs(a), 1e-12) for d, a in zip(diffs, curves["ref"]))
        rows[name] = {"steps": len(diffs), "max_abs_loss_diff": max(diffs), "max_rel_loss_diff": rel,
                      "bitwise_equal": diffs == [0.0] * len(diffs), "ref_losses": curves["ref"],
                      "ours_losses": curves["ours"]}
        print(f"{name}: {len(diffs)} steps, max |loss diff| {max(diffs):.2e} (relative {rel:.1e})"
              f"{', bitwise equal' if rows[name]['bitwise_equal'] else ''}")
    return rows


def extract(ref: str, root: str) -> str:
    """`git archive <ref> llamavit` unpacked as <root>/llamavit_ref; -> the resolved commit."""
    repo = os.path.dirname(HERE)
    commit = subprocess.run(["git", "-C", repo, "rev-parse", ref], check=True, capture_output=True,
                            text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", repo, "archive", commit, "llamavit"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    os.rename(os.path.join(root, "llamavit"), os.path.join(root, "llamavit_ref"))
    return commit


def alternating_rounds(fns: dict, rounds: int, warmup: int, other_load) -> dict:
    """Warm-up calls, then `rounds` rounds of one call of each fn, in forward order on even rounds and reverse
    order on odd ones. -> {"times": {name: [seconds per round]}, "other_cores": [cores other processes used]}."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times, other, load = {n: [] for n in names}, [], other_load()
    for r in range(rounds):
        load.cores_since_last()
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
        other.append(load.cores_since_last())
    return {"times": times, "other_cores": other}


def train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Forward + backward of a scalar of the logits (the gradients left in the parameters)."""
    model.zero_grad(set_to_none=True)
    model(x).float().logsumexp(-1).mean().backward()


def compare_train_steps(ref, ours, x: torch.Tensor, rounds: int, warmup: int, other_load, peer=None) -> dict:
    """Both models' gradients on x[:2] compared, then alternating timed train steps on x (ratio = ref s / ours s);
    with a peer model, it runs in the same rounds and each version's ratio to it is reported too."""
    train_step(ref, x[:2])
    train_step(ours, x[:2])
    diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(ref.parameters(), ours.parameters())
               if a.grad is not None and b.grad is not None)
    fns = {"ref": lambda: train_step(ref, x), "ours": lambda: train_step(ours, x)}
    if peer is not None:
        fns["peer"] = lambda: train_step(peer, x)
    times = alternating_rounds(fns, rounds, warmup, other_load)["times"]

    def per_round(num: str, den: str) -> list:
        return sorted(a / b for a, b in zip(times[num], times[den]))

    q1, q2, q3 = statistics.quantiles(per_round("ref", "ours"), n=4)
    result = {"max_abs_grad_diff": diff, "rounds": rounds, "ratio_ours_over_ref": q2, "ratio_quartiles": [q1, q3],
              **{f"{k}_img_per_s": x.shape[0] / statistics.median(v) for k, v in times.items()}}
    if peer is not None:
        result["ref_vs_peer"] = statistics.median(per_round("peer", "ref"))
        result["ours_vs_peer"] = statistics.median(per_round("peer", "ours"))
    return result


def build_pair(name: str, kwargs: dict, ref_registry, ours_create):
    """(ref model, our model) from the same seed, eval mode; iLLaMA at soft-mask rate 0 (causal)."""
    torch.manual_seed(0)
    ref = ref_registry._build(name, **kwargs).eval()
    torch.manual_seed(0)
    ours = ours_create(name, **kwargs).eval()
    if not (type(ref).__module__.startswith("llamavit_ref.") and type(ours).__module__.startswith("llamavit.")):
        raise RuntimeError(f"the two models are {type(ref).__module__} and {type(ours).__module__}: llamavit was "
                           f"imported before the ref package")
    for m in (ref, ours):
        if hasattr(m, "set_soft_mask_rate"):
            m.set_soft_mask_rate(0.0)
    return ref, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="the earlier commit (anything `git rev-parse` takes)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--training", action="store_true", help="also compare the trainers' loss curves")
    ap.add_argument("--train-steps", action="store_true", help="also time forward + backward steps")
    ap.add_argument("--models", nargs="*", default=list(MODELS), help=f"registry names (default {list(MODELS)})")
    ap.add_argument("--peers", nargs="*", help="with --train-steps: a timm model per --models entry, timed beside")
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args()
    if args.peers and (not args.train_steps or len(args.peers) != len(args.models)):
        ap.error(f"--peers takes one timm name per --models entry ({len(args.models)}) and needs --train-steps")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Overwriting")   # both packages register the same names in timm
    with tempfile.TemporaryDirectory() as root:
        commit = extract(args.ref, root)
        sys.path.insert(0, root)
        ref_registry = importlib.import_module("llamavit_ref.models.registry")
        import llamavit  # imported second: timm's registry then points at the current package
        from throughput import OtherLoad
        x = torch.randn(args.batch, 3, args.img_size, args.img_size)
        result = {"ref": commit, "batch": args.batch, "img_size": args.img_size, "threads": args.threads,
                  "cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch": torch.__version__, "models": {}}
        for index, name in enumerate(args.models):
            kwargs = MODELS.get(name, {})
            ref, ours = build_pair(name, {"img_size": args.img_size, **kwargs}, ref_registry, llamavit.create_model)
            same = all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ours.state_dict().values()))
            with torch.inference_mode():
                diff = (ref(x[:2]) - ours(x[:2])).abs().max().item()

                def run_ref(m=ref):
                    with torch.inference_mode():
                        m(x)

                def run_ours(m=ours):
                    with torch.inference_mode():
                        m(x)

                timing = alternating_rounds({"ref": run_ref, "ours": run_ours}, args.rounds, args.warmup, OtherLoad)
            quiet = [i for i, c in enumerate(timing["other_cores"]) if c is not None and c < 0.15]
            picks = quiet if len(quiet) >= 3 else list(range(len(timing["other_cores"])))
            med = {k: statistics.median(v[i] for i in picks) for k, v in timing["times"].items()}
            ratios = sorted(timing["times"]["ref"][i] / timing["times"]["ours"][i] for i in picks)
            q1, q2, q3 = statistics.quantiles(ratios, n=4)
            row = {"same_weights": same, "max_abs_logit_diff": diff, "rounds": len(timing["other_cores"]),
                   "quiet_rounds": len(quiet), "ref_img_per_s": args.batch / med["ref"],
                   "ours_img_per_s": args.batch / med["ours"], "ratio_ours_over_ref": q2,
                   "ratio_quartiles": [q1, q3]}
            result["models"][name] = row
            print(f"{name}: ref {row['ref_img_per_s']:.1f} img/s, ours {row['ours_img_per_s']:.1f} img/s, "
                  f"ratio {q2:.3f} (quartiles {q1:.3f}-{q3:.3f}; {row['quiet_rounds']}/{row['rounds']} quiet rounds; "
                  f"same weights {same}, max |logit diff| {diff:.1e})")
            if args.train_steps:
                peer = None
                if args.peers:
                    peer = timm.create_model(args.peers[index], img_size=args.img_size).eval()
                row["train_steps"] = compare_train_steps(ref, ours, x, args.rounds, args.warmup, OtherLoad, peer)
                t = row["train_steps"]
                print(f"{name} train steps: ref {t['ref_img_per_s']:.2f} img/s, ours {t['ours_img_per_s']:.2f} img/s, "
                      f"ratio {t['ratio_ours_over_ref']:.3f} (quartiles {t['ratio_quartiles'][0]:.3f}-"
                      f"{t['ratio_quartiles'][1]:.3f}), max |grad diff| {t['max_abs_grad_diff']:.1e}")
                if peer is not None:
                    print(f"  beside {args.peers[index]} ({t['peer_img_per_s']:.2f} img/s): "
                          f"ref {t['ref_vs_peer']:.3f}x, ours {t['ours_vs_peer']:.3f}x the peer "
                          f"(medians of per-round ratios)")
        if args.training:
            ref = importlib.import_module("llamavit_ref")
            importlib.import_module("llamavit_ref.train")
            importlib.import_module("llamavit.train")
            result["training"] = compare_training(ref, llamavit, os.path.join(root, "runs"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
