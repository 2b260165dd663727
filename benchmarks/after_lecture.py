"""What each change after the lecture costs, side by side on this machine.

    python benchmarks/after_lecture.py                       # per step, 3 rounds; one whole run each
    python benchmarks/after_lecture.py --repeat 1 --full 0   # per step only, one round: a quick look
    python benchmarks/after_lecture.py --repeat 0 --full 0   # the counts alone, nothing timed

Per step: each config of the path (``v7_cpu``, ``v7_cpu_1_rope`` ... ``v7_cpu_6_warmdown``,
``v8_cpu``) and ``v7_cpu_muon`` (Muon alone) times its training step (forward, backward, optimizer
step: the ``step-fast`` variant of ``benchmarks/variants.py``) in a fresh process with one thread,
as ``reproduce --jobs`` runs them. A round times every config once; each ratio to ``v7_cpu`` is
taken within a round, and the table gives its median over rounds with the range. The last column
sets Muon's Newton–Schulz FLOPs beside the model's own training FLOPs (forward and backward): a
floor under Muon's cost that no implementation removes. It grows with the hidden matrices and the
iterations, not with the tokens of a step, so it shrinks as the batch grows (v8's line, counted
without running it). The first lines also read, from reproduce's results.json, where v8_cpu's
mean val curve reaches v7_cpu's final figure.

Whole runs (``--full`` rounds): ``fit`` of ``v7_cpu`` and of ``v8_cpu`` as a user runs it, one
thread each, logger and checkpoints included: wall seconds from after the imports to the end of
the last estimate, the measure of v8_cpu's speed target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import yaml

from run import REPO, cpu_name, ratio, rounds
from variants import newton_schulz_flops, train_flops

from nanogpt_pl.model import GPT, GPTConfig
from nanogpt_pl.optim import hidden_matrices

PATH = ["v7_cpu", "v7_cpu_1_rope", "v7_cpu_2_rmsnorm", "v7_cpu_3_relu2", "v7_cpu_4_qk_norm",
        "v7_cpu_5_zero_init", "v7_cpu_6_warmdown", "v8_cpu", "v7_cpu_muon"]
FULL = ["v7_cpu", "v8_cpu"]


def _config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


def tokens_per_step(name: str) -> int:
    data = _config(name)["data"]
    return data["batch_size"] * data["block_size"]


def newton_schulz_share(name: str) -> float:
    """Muon's Newton–Schulz FLOPs per step over the model's training FLOPs, at a config's sizes
    (Tiny Shakespeare's 65 characters): counted on a model without storage (meta tensors), so a
    GPU config is counted here too."""
    model = _config(name)["model"]
    if "hidden_optimizer" not in model:
        return 0.0
    gpt = GPTConfig(**model["config"], block_size=_config(name)["data"]["block_size"])
    with torch.device("meta"):
        hidden, _ = hidden_matrices(GPT(gpt))
    muon = torch.optim.Muon(hidden, **model["hidden_optimizer"].get("init_args", {}))
    return newton_schulz_flops(muon) / train_flops(gpt, tokens_per_step(name))


def passes_baseline(results: dict, name: str, base: str) -> tuple[int, int] | None:
    """The first estimate at which ``name``'s val loss, averaged over its seeds, is at or below
    ``base``'s final mean val, with ``name``'s step count, from reproduce's results.json (None
    where it never is, or either version is not recorded)."""
    if name not in results or base not in results:
        return None
    record = results[name]
    curves = [dict(seed["val_curve"]) for seed in record["seeds"]]
    for step in sorted(curves[0]):
        if statistics.mean(curve[step] for curve in curves) <= results[base]["val"]["mean"]:
            return step, record["steps"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per config")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the per-step table")
    parser.add_argument("--full", type=int, default=1, help="rounds of whole runs of v7_cpu and v8_cpu (0: none)")
    args = parser.parse_args()
    if args.steps < 1 or args.repeat < 0 or args.full < 0:
        parser.error("--steps must be positive, --repeat and --full zero or more")
    print(f"{cpu_name()}, torch {torch.__version__}, one thread\n")
    print(f"Newton–Schulz FLOPs / model FLOPs per step: v8_cpu {newton_schulz_share('v8_cpu'):.2f}, "
          f"v8 {newton_schulz_share('v8'):.2f} (its {tokens_per_step('v8')} tokens per step against v8_cpu's {tokens_per_step('v8_cpu')})")
    results = json.loads((REPO / "docs" / "reproduction" / "results.json").read_text())
    if passed := passes_baseline(results, "v8_cpu", "v7_cpu"):
        print(f"In docs/reproduction/results.json, v8_cpu's mean val (over its seeds) first reaches v7_cpu's "
              f"final mean {results['v7_cpu']['val']['mean']:.4f} at the estimate of step {passed[0]} of {passed[1]}.")
    print()
    if args.repeat:
        variants = {name: (("step-fast", name), {"threads": 1, "steps": args.steps}) for name in PATH}
        runs = rounds(variants, args.repeat)
        print(f"Per training step: {args.steps} steps, {args.repeat} round(s)\n")
        print("| config | ms per step | / v7_cpu | Newton–Schulz FLOPs / model FLOPs |")
        print("|---|---|---|---|")
        for name in PATH:
            ms = statistics.median(r[name]["step_seconds"] for r in runs) * 1e3
            print(f"| `{name}` | {ms:.1f} | {ratio(runs, name, 'v7_cpu', 'step_seconds')} "
                  f"| {newton_schulz_share(name):.2f} |")
    if args.full:
        runs = rounds({name: (("fit", name), {"threads": 1}) for name in FULL}, args.full)
        print(f"\nWhole runs (`fit`, the config's steps and estimates): {args.full} round(s)\n")
        print("| config | wall seconds | / v7_cpu | val |")
        print("|---|---|---|---|")
        for name in FULL:
            seconds = statistics.median(r[name]["seconds"] for r in runs)
            vals = ", ".join(sorted({f"{r[name]['val']:.4f}" for r in runs}))  # seeded: one value
            print(f"| `{name}` | {seconds:.1f} | {ratio(runs, name, 'v7_cpu', 'seconds')} | {vals} |")


if __name__ == "__main__":
    sys.exit(main())
