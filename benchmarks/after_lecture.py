"""What each change after the lecture costs per training step, side by side on this machine.

    python benchmarks/after_lecture.py               # the path v7_cpu .. v8_cpu, 100 steps, 3 rounds
    python benchmarks/after_lecture.py --repeat 1    # one round, noisier

Each config of the path (``v7_cpu``, ``v7_cpu_1_rope`` ... ``v7_cpu_6_warmdown``, ``v8_cpu``) and
``v7_cpu_muon`` (Muon alone) times its training step (forward, backward, optimizer step: the
``step-fast`` variant of ``benchmarks/variants.py``) in a fresh process with one thread, as
``reproduce --jobs`` runs them. A round times every config once; each ratio to ``v7_cpu`` is
taken within a round, and the table gives its median over rounds with the range.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from run import cpu_name, ratio, rounds

PATH = ["v7_cpu", "v7_cpu_1_rope", "v7_cpu_2_rmsnorm", "v7_cpu_3_relu2", "v7_cpu_4_qk_norm",
        "v7_cpu_5_zero_init", "v7_cpu_6_warmdown", "v8_cpu", "v7_cpu_muon"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per config")
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    args = parser.parse_args()
    variants = {name: (("step-fast", name), {"threads": 1, "steps": args.steps}) for name in PATH}
    runs = rounds(variants, args.repeat)
    print(f"{cpu_name()}, torch {torch.__version__}, one thread, {args.steps} steps, {args.repeat} round(s)\n")
    print("| config | ms per step | / v7_cpu |")
    print("|---|---|---|")
    for name in PATH:
        ms = statistics.median(r[name]["step_seconds"] for r in runs) * 1e3
        print(f"| `{name}` | {ms:.1f} | {ratio(runs, name, 'v7_cpu', 'step_seconds')} |")


if __name__ == "__main__":
    sys.exit(main())
