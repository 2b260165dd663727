"""The run's random streams: one seed in, a distinct seed per (stream, process) out."""

from __future__ import annotations

import torch

from nanogpt_pl.data import STREAMS
from nanogpt_pl.run.seeds import STREAM_KEYS, stream_seed


def first_draws(seed: int) -> torch.Tensor:
    return torch.rand(8, generator=torch.Generator().manual_seed(seed))


def test_every_stream_of_every_process_gets_its_own_seed_and_draws():
    assert set(STREAMS) < set(STREAM_KEYS)  # the sampler's streams, and dropout
    keys = [(seed, stream, rank) for seed in (1, 2, 1337) for stream in STREAM_KEYS for rank in range(8)]
    seeds = [stream_seed(*key) for key in keys]
    # Distinct in the low 32 bits too: all that torch's CPU generator keeps of a seed.
    assert len({s & 0xFFFF_FFFF for s in seeds}) == len(keys)
    # The collisions of adding offsets to the seed: rank 0's training stream and its dropout,
    # seed 1's evaluation and seed 2's training, rank 0 and rank 1 of one stream.
    for a, b in [
        ((1337, "train", 0), (1337, "dropout", 0)),
        ((1, "eval", 0), (2, "train", 0)),
        ((1337, "train", 0), (1337, "train", 1)),
        ((1337, "train", 0), (1337, "eval", 0)),
    ]:
        assert not torch.equal(first_draws(stream_seed(*a)), first_draws(stream_seed(*b))), (a, b)


def test_stream_seeds_repeat_and_fit_a_generator():
    assert stream_seed(1337, "train", 3) == stream_seed(1337, "train", 3)
    for stream in STREAM_KEYS:
        seed = stream_seed(0, stream, 0)
        assert 0 <= seed < 2**64
        torch.Generator().manual_seed(seed)  # the full 64 bits are accepted
