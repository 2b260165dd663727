"""Large corpora: preparation time, memory of `fit`, start-up, and sampling from the memory map.

    python benchmarks/data.py                  # 1 MB, 100 MB and 1 GB corpora (about 4 minutes, 3 GB of disk)
    python benchmarks/data.py --sizes 1 100    # only the smaller ones

Each corpus is concatenated copies of Tiny Shakespeare (1 copy, 90 and 900), written to a
temporary folder that is removed afterwards; its token cache goes there too. Per size it prints:

- prepare: the first run's one pass over the text into the token cache (in a fresh process, the
  text just written, so mostly in the page cache);
- peak RSS of `fit` for 5 steps of v2 (its final estimate over 20 batches included), in a fresh
  process each: the first run (building the cache) and the second (mapping it);
- first step: seconds from starting the second run's process to its first training step;
- sampling: the time per `sample("train")` of v7's batch (64 blocks of 256) from the memory map,
  divided by that of the former in-memory path (the whole split as one int64 tensor), both in
  this process, alternating, the median of 5 rounds of 200 calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare" / "input.txt"
sys.path.insert(0, str(REPO))  # this checkout's nanogpt_pl, installed or not
COPIES = {1: 1, 100: 90, 1000: 900}  # nominal MB -> copies of Tiny Shakespeare (1.1 MB)
FIT = [
    "fit", "--config", str(REPO / "configs" / "v2.yaml"), "--trainer.max_steps", "5",
    "--trainer.val_check_interval", "5", "--data.eval_iters", "20", "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
    "--trainer.enable_model_summary", "false",
]


def child(args: list[str]) -> tuple[float, float, float]:
    """Run this script's ``--child`` mode in a fresh process: its wall seconds, its peak RSS in MB, and
    the seconds it reported (preparation), or from its start to its first training step (``fit``)."""
    with tempfile.TemporaryDirectory() as cwd:  # its checkpoint lands here
        out = Path(cwd) / "first_step.txt"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        start = time.time()
        process = subprocess.Popen([sys.executable, __file__, "--child", str(out), *args], cwd=cwd, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.time() - start
        if status != 0:
            sys.exit(f"the child process failed: {' '.join(args)}")
        reported = float(out.read_text())
    seconds = reported if args[0] == "prepare" else reported - start  # fit reports the first step's clock time
    return wall, usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def run_child(out: Path, args: list[str]) -> None:
    if args[0] == "prepare":
        from nanogpt_pl.corpus import load_corpus

        start = time.perf_counter()
        load_corpus(args[1], args[2])
        out.write_text(repr(time.perf_counter() - start))
        return
    import lightning as L

    from nanogpt_pl.cli import cli

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0:
                out.write_text(repr(time.time()))

    sys.argv = sys.argv[:1]  # the arguments are given to cli() alone
    run = cli(args[1:], run=False)  # without "fit": run=False builds the trainer, no subcommands
    run.trainer.callbacks.append(FirstStep())
    run.trainer.fit(run.model, datamodule=run.datamodule)


def sampling_ratio(path: Path, cache: Path) -> float:
    """Per-call time of sampling from the memory map over that of the in-memory int64 tensor."""
    import torch

    from nanogpt_pl.data import CharDataModule

    dm = CharDataModule(data_path=str(path), cache_dir=str(cache), block_size=256, batch_size=64)
    dm.setup("fit")
    in_memory = torch.from_numpy(dm._splits["train"].astype("int64"))

    def mapped(g):
        return dm.sample("train", 1, g)

    def reference(g):  # the sampler before the cache, verbatim
        ix = torch.randint(len(in_memory) - 256, (64,), generator=g)
        blocks = in_memory[ix.to(in_memory.device)[:, None] + torch.arange(257, device=in_memory.device)]
        return blocks[:, :-1], blocks[:, 1:]

    def per_call(fn, calls=200):
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(calls):
            fn(g)
        return (time.perf_counter() - start) / calls

    per_call(mapped), per_call(reference)  # warm-up: page faults, allocator
    ratios = [per_call(mapped) / per_call(reference) for _ in range(5)]
    return statistics.median(ratios)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return run_child(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(COPIES), choices=list(COPIES))
    sizes = parser.parse_args().sizes
    text = SHAKESPEARE.read_bytes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nanogpt-corpora-") as tmp:
        for size in sizes:
            path = Path(tmp) / f"corpus_{size}mb.txt"
            with open(path, "wb") as f:
                for _ in range(COPIES[size]):
                    f.write(text)
            print(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB", file=sys.stderr, flush=True)
            _, _, prepare = child(["prepare", str(path), str(Path(tmp) / f"prepare_{size}")])
            cache = Path(tmp) / f"cache_{size}"
            data = ["--data.data_path", str(path), "--data.cache_dir", str(cache)]
            first_wall, first_rss, _ = child([*FIT, *data])
            second_wall, second_rss, first_step = child([*FIT, *data])
            ratio = sampling_ratio(path, cache)
            rows.append((size, path.stat().st_size / 1e6, prepare, first_rss, second_rss, first_wall, second_wall,
                         first_step, ratio))
            path.unlink()
    print("| corpus | prepare (s) | peak RSS, 1st run (MB) | peak RSS, 2nd run (MB) | wall 1st / 2nd run (s) "
          "| 2nd run to 1st step (s) | sampling, map / in-memory |")
    print("|---|---|---|---|---|---|---|")
    for size, mb, prepare, rss1, rss2, wall1, wall2, first_step, ratio in rows:
        print(f"| {mb:,.0f} MB | {prepare:.1f} | {rss1:,.0f} | {rss2:,.0f} | {wall1:.1f} / {wall2:.1f} "
              f"| {first_step:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
