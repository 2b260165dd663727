"""Every random stream of a run, derived from its one seed.

A run draws from several streams in each process: the sampler's training and evaluation batches,
and the global torch generator that dropout draws from. Each gets its own seed, spawned from
(run seed, stream, global rank) by NumPy's ``SeedSequence``, which hashes the whole key: no two
streams share a seed by construction (the old scheme of adding offsets to the run seed gave rank
0's training stream and its dropout the same one, and seed 1's evaluation that of seed 2's
training), and nearby keys give unrelated seeds.

Process 0 of a multi-process run gets the seeds of a single-process run, so its streams are those
of a one-device run with the same seed.
"""

from __future__ import annotations

import numpy as np

# A stream's place in the spawn key. Fixed numbers, not positions in some tuple: adding a stream
# must not reseed the others (and so change every recorded run).
STREAM_KEYS = {"train": 0, "eval": 1, "dropout": 2}


def stream_seed(seed: int, stream: str, rank: int) -> int:
    """The 64-bit seed of ``stream`` in the process of global rank ``rank``.

    On a GPU all 64 bits seed the generator; torch's CPU generator keeps the low 32, where two of a
    run's streams can coincide only by chance (about 1 in 4 billion per pair), not by formula.
    """
    words = np.random.SeedSequence(seed, spawn_key=(STREAM_KEYS[stream], rank)).generate_state(2, np.uint32)
    return int(words[0]) | int(words[1]) << 32
