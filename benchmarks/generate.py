"""Sampling speed as the output grows: characters per second early and late in one long sample.

    python benchmarks/generate.py                       # 100,000 characters from a small random GPT
    python benchmarks/generate.py --tokens 1000000      # longer: the late window starts later

The model is random (the speed of a step does not depend on what it learned) and small, so the
cost of keeping the output, not the forward pass, is what could change along the way. Characters
go through ``stream_samples``, the loop the ``generate`` command prints from, on the CPU. After a
warm-up of ``--window`` characters, it prints chars/s over the next ``--window`` and over the last
``--window``, and their ratio: 1.0 means the speed does not depend on how much has been written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's nanogpt_pl, installed or not

from nanogpt_pl.data import CharTokenizer  # noqa: E402
from nanogpt_pl.generate import stream_samples  # noqa: E402
from nanogpt_pl.model import GPT, GPTConfig  # noqa: E402

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's 65


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="characters to generate")
    parser.add_argument("--window", type=int, default=2_000, help="characters timed early and at the end")
    args = parser.parse_args()
    if not 0 < 3 * args.window <= args.tokens:
        parser.error("--window must be positive and at most a third of --tokens")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(CHARS), block_size=32, n_embd=32, n_head=2, n_layer=1)).eval()
    steps = stream_samples(model, CharTokenizer(CHARS), "", args.tokens, generator=torch.Generator().manual_seed(0))
    next(steps)  # the start text
    timed = (args.window, 2 * args.window, args.tokens - args.window, args.tokens)
    marks = [time.perf_counter() for i, _ in enumerate(steps, 1) if i in timed]
    early = args.window / (marks[1] - marks[0])
    late = args.window / (marks[3] - marks[2])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} characters")
    print(f"early: {early:,.0f} chars/s (characters {args.window + 1}-{2 * args.window})")
    print(f"late:  {late:,.0f} chars/s (the last {args.window})")
    print(f"late / early: {late / early:.2f}")


if __name__ == "__main__":
    main()
