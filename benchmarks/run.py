"""Speed of nanogpt_pl against the lecture's plain script, side by side on this machine.

    python benchmarks/run.py                            # v2 and v6 at full length, v7 steps; 3 rounds
    python benchmarks/run.py --repeat 1                 # one round: a third of the time, noisier
    python benchmarks/run.py --max_steps 20 --repeat 1  # a quick look (ratios then mean little)

Each variant runs in a fresh process (``benchmarks/variants.py``). A round runs every variant
once, one after the other; ``--repeat`` rounds follow each other. Every ratio is computed within
a round, between runs minutes apart, and the tables give its median over the rounds with the
range: on a shared machine a single run can be off by 10-20%. The tables hold wall seconds from
the start of training to the end of the last estimate (the targets' measure; it includes
compilation), the CPU seconds of that process (steadier when other processes share the machine;
they leave out inductor's compile workers), and the whole process's wall time, start-up and
imports included, each the median over rounds. The small models (v2, v6) run with one intra-op
thread in every variant: their tensors are too small to split, and a second thread only adds
waiting, worst when the cores are shared. v7 uses all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = Path(__file__).with_name("variants.py")
TARGETS: list[str] = []  # one line per speed target, printed at the end


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        return f"{model}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def measure(variant: str, config: str, *overrides: str, threads: int | None = None, steps: int | None = None) -> dict:
    """Run one variant in a fresh process; its JSON result plus the whole process's wall time."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, str(VARIANTS)]
    if steps is not None:
        command += ["--steps", str(steps)]
    command += [variant, str(REPO / "configs" / f"{config}.yaml"), *overrides]
    print(f"  {variant} {config} {' '.join(overrides)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as cwd:  # logs and checkpoints of `fit` land here
        start = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        process_seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"error: {variant} {config} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = process_seconds
    return result


def rounds(variants: dict[str, tuple], repeat: int) -> list[dict[str, dict]]:
    """``repeat`` rounds, each running every variant once, in order: a ratio compares two runs of
    one round, made minutes apart, rather than runs far apart in time."""
    return [{name: measure(*spec[0], **spec[1]) for name, spec in variants.items()} for _ in range(repeat)]


def ratio(runs: list[dict[str, dict]], name: str, base: str, key: str) -> str:
    """The median over rounds of name/base, with the range over rounds when there are several."""
    if name == base:
        return "1.00"
    values = [r[name][key] / r[base][key] for r in runs]
    text = f"{statistics.median(values):.2f}"
    return text + (f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else "")


def protocol_rows(config: str, protocol: list[str], repeat: int) -> list[str]:
    """Full training protocol: the lecture's script, a plain loop around our GPT, a bare Lightning
    ``Trainer`` around our module, ``fit``."""
    variants = {
        "lecture's plain script": (("lecture", config, *protocol), {"threads": 1}),
        "plain loop, our GPT": (("plain", config, *protocol), {"threads": 1}),
        "bare Lightning `Trainer`": (("lightning", config, *protocol), {"threads": 1}),
        "`fit`": (("fit", config, *protocol), {"threads": 1}),
    }
    if config == "v6":
        variants["`fit --model.compile true`"] = (("fit", config, *protocol, "--model.compile", "true"), {"threads": 1})
    runs = rounds(variants, repeat)
    base, plain = "lecture's plain script", "plain loop, our GPT"
    rows = []
    for name in variants:
        seconds, cpu, process = (statistics.median(r[name][key] for r in runs)
                                 for key in ("seconds", "cpu_seconds", "process_seconds"))
        vals = sorted({f"{r[name]['val']:.4f}" for r in runs})  # runs are seeded: one value
        rows.append(
            f"| {config} | {name} | {seconds:.1f} | {cpu:.1f} | {process:.1f} | {', '.join(vals)} "
            f"| {ratio(runs, name, base, 'seconds')} | {ratio(runs, name, base, 'cpu_seconds')} "
            f"| {ratio(runs, name, plain, 'seconds')} | {ratio(runs, name, plain, 'cpu_seconds')} |"
        )
    TARGETS.append(f"- {config}: `fit` / lecture's script {ratio(runs, '`fit`', base, 'seconds')} wall, "
                   f"{ratio(runs, '`fit`', base, 'cpu_seconds')} CPU" + (" (target: <= 0.40 wall)" if config == "v6" else ""))
    TARGETS.append(f"- {config}: `fit` / plain loop around our GPT {ratio(runs, '`fit`', plain, 'seconds')} wall, "
                   f"{ratio(runs, '`fit`', plain, 'cpu_seconds')} CPU (target: <= 1.10)")
    return rows


def step_rows(steps: int, repeat: int) -> list[str]:
    """v7 training step: the lecture's formulation in fp32 against the fast path."""
    variants = {
        "lecture formulation, fp32": (("step-lecture", "v7"), {"steps": steps}),
        "fast path, fp32": (("step-fast", "v7", "--trainer.precision", "32-true"), {"steps": steps}),
        "fast path, v7.yaml precision": (("step-fast", "v7"), {"steps": steps}),
    }
    runs = rounds(variants, repeat)
    base = "lecture formulation, fp32"
    TARGETS.append(f"- v7 step, fast path at v7.yaml's precision / lecture formulation in fp32: "
                   f"{ratio(runs, 'fast path, v7.yaml precision', base, 'step_seconds')} (target: <= 0.60)")
    rows = []
    for name in variants:
        step = statistics.median(r[name]["step_seconds"] for r in runs)
        first = runs[0][name]
        rows.append(
            f"| v7 step | {name} ({first['precision']}, {first['device']}) | {step:.3f} "
            f"| {first['tokens'] / step:,.0f} | {ratio(runs, name, base, 'step_seconds')} |"
        )
    return rows


def gpu_rows(gpu: str, steps: int) -> list[str]:
    """On a GPU: the full v7 run (compiled), tokens/s and MFU of the fast path."""
    from lightning.fabric.utilities.throughput import get_available_flops

    full = measure("fit", "v7", "--model.compile", "true")
    step = measure("step-fast", "v7", "--model.compile", "true", steps=steps)
    peak = get_available_flops(torch.device("cuda"), torch.bfloat16)
    mfu = f"{step['flops_per_step'] / step['step_seconds'] / peak:.1%}" if peak else "unknown peak"
    return [
        f"| {gpu} | v7 full run (5000 steps + estimates), `fit --model.compile true` | {full['seconds']:.1f} s wall, "
        f"val {full['val']:.4f} |",
        f"| {gpu} | v7 training step, fast path, bf16-mixed, compiled | {step['step_seconds'] * 1000:.1f} ms, "
        f"{step['tokens_per_second']:,.0f} tokens/s, MFU {mfu} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max_steps", type=int, default=None, help="shorten v2/v6 (default: each config's own)")
    parser.add_argument("--eval_iters", type=int, default=None, help="shorten the estimate (default: 200)")
    parser.add_argument("--v7_steps", type=int, default=3, help="timed v7 steps per variant, after one warm-up")
    parser.add_argument("--configs", nargs="*", default=["v2", "v6"], help="small configs run at full length")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of every variant; times are medians, ratios medians of each round's ratio")
    args = parser.parse_args()
    protocol = []
    if args.max_steps is not None:
        protocol += ["--trainer.max_steps", str(args.max_steps)]
    if args.eval_iters is not None:
        protocol += ["--data.eval_iters", str(args.eval_iters)]

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"Machine: {cpu_name()}; GPU: {gpu or 'none'}; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| config | variant | wall s | CPU s | process s | final val | / lecture, wall | / lecture, CPU "
          "| / plain loop, wall | / plain loop, CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        for row in protocol_rows(config, protocol, args.repeat):
            print(row, flush=True)
    if args.v7_steps:
        print("\n| config | variant | s / step | tokens / s | / lecture fp32 |")
        print("|---|---|---|---|---|")
        for row in step_rows(args.v7_steps, args.repeat):
            print(row, flush=True)
    print("\n| GPU | measure | result |\n|---|---|---|")
    if gpu:
        for row in gpu_rows(gpu, max(args.v7_steps, 20)):
            print(row, flush=True)
    else:
        print("| none | v7 full run, tokens/s, MFU | not yet run on a GPU |")
    print("\nAgainst the targets:\n" + "\n".join(TARGETS))


if __name__ == "__main__":
    main()
