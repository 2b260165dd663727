"""Characters in, blocks of token ids out: the tokenizer and the lecture's random block sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import IterableDataset

from nanogpt_pl import resources
from nanogpt_pl.run import steps
from nanogpt_pl.corpus import check_splits, load_corpus
from nanogpt_pl.errors import UsageError
from nanogpt_pl.run.seeds import stream_seed

SPLITS = ("train", "val")
# The sampler's random streams: training batches, and evaluation batches (kept apart so that
# evaluating never shifts the training batches).
STREAMS = ("train", "eval")

# Evaluation stacks many of its random batches into one forward pass: the mean loss is the same
# (every batch has batch_size * block_size tokens) and a few large kernels beat many small ones.
# This caps the tokens per pass so memory stays bounded for large batch and block sizes.
EVAL_TOKENS_PER_FORWARD = 2**16

# The most of an accelerator's free memory the text may take to be copied there whole (set when
# training starts, before activations and optimizer state claim theirs).
DEVICE_SHARE = 0.25


def vocab_size_of(
    data_path: str, block_size: int, train_fraction: float, cache_dir: Optional[str] = None
) -> int:
    """How many distinct characters a corpus holds: the model's ``vocab_size``.

    Reads the corpus's cache (building it on first use), which also checks the text: every failure
    is one line that names the file and the fix.
    """
    corpus = load_corpus(data_path, cache_dir)
    check_splits(len(corpus.tokens), corpus.path, block_size, train_fraction)
    return len(corpus.chars)


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index in the sorted vocabulary."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = ", ".join(repr(ch) for ch in unknown)
            raise UsageError(
                f"characters not in the vocabulary: {shown}; drop them "
                "(the model only knows the characters of its training text)."
            )
        return [self.stoi[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class Request(NamedTuple):
    """What a dataloader yields: which split to draw from and how many batches to stack.

    The blocks themselves are drawn after the request reaches the training device
    (``on_after_batch_transfer``): vectorized, from a copy of the text that already lives there,
    and in the order the steps consume them, so the sampler's state in a checkpoint is exact.
    """

    split: str
    n_batches: int


class _Endless(IterableDataset):
    def __iter__(self) -> Iterator[Request]:
        while True:
            yield Request("train", 1)


class _Requests:
    """A fixed list of requests, iterated afresh by every evaluation. Not a DataLoader, so under DDP
    Lightning does not re-split it with a ``DistributedSampler`` (which pads by repeating items):
    each process already holds its share."""

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)


class CharDataModule(L.LightningDataModule):
    """Any UTF-8 text (a file, or a folder of ``.txt`` files), split 90/10, served as random blocks of characters."""

    def __init__(
        self,
        data_path: str = str(resources.data_file()),
        block_size: int = 256,
        batch_size: int = 64,
        eval_iters: int = 200,
        train_fraction: float = 0.9,
        cache_dir: Optional[str] = None,
    ) -> None:
        """
        Args:
            data_path: UTF-8 text file to train on, or a folder whose ``*.txt`` files, sorted by
                path, are concatenated; its sorted set of characters is the vocabulary.
            block_size: Characters per training example (the model's context length).
            batch_size: Random blocks per training step (per device).
            eval_iters: Random batches per split averaged into each train/val loss estimate.
            train_fraction: Leading fraction of the text used for training; the rest is validation.
            cache_dir: Where the text's token ids are cached, read once and memory-mapped by every
                run (null: $XDG_CACHE_HOME/nanogpt_pl, i.e. ~/.cache/nanogpt_pl).
        """
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("eval_iters", eval_iters)):
            if value < 1:
                raise UsageError(f"data.{name} must be a positive integer, got {value}.")
        if not 0.0 < train_fraction < 1.0:
            raise UsageError(f"data.train_fraction must be between 0 and 1, got {train_fraction}.")
        self.save_hyperparameters()  # logged with the run, shown in TensorBoard's HPARAMS tab
        self.data_path = Path(data_path)
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_iters = eval_iters
        self.train_fraction = train_fraction
        self.cache_dir = cache_dir
        self._tokenizer: Optional[CharTokenizer] = None
        self._splits: dict[str, np.ndarray] = {}  # memory maps of the cached token ids
        self._on_device: dict[tuple[str, torch.device], Optional[torch.Tensor]] = {}  # None: does not fit
        self._generators: dict[str, torch.Generator] = {}
        self._generator_device = torch.device("cpu")

    # -- the text ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> CharTokenizer:
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def prepare_data(self) -> None:
        # Lightning calls this on one process per machine while the others wait: the cache is
        # built once, then every process maps the same file.
        load_corpus(self.data_path, self.cache_dir)

    def _load(self) -> None:
        """Map the cached token ids (building the cache if missing) and check the splits."""
        corpus = load_corpus(self.data_path, self.cache_dir)
        n = check_splits(len(corpus.tokens), corpus.path, self.block_size, self.train_fraction)
        self._tokenizer = CharTokenizer(corpus.chars)
        self._splits = {"train": corpus.tokens[:n], "val": corpus.tokens[n:]}
        self._on_device = {}

    # -- sampling ---------------------------------------------------------------------------
    def sample(
        self, split: str, n_batches: int = 1, generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_batches * batch_size`` random blocks of ``split``: x (N, block_size) and y, x shifted by one.

        The offsets are the lecture's ``torch.randint`` draws from ``generator``. On an accelerator
        the split lives there when it fits: with a generator on that device, drawing and gathering
        queue on the device and the host never waits for it. Otherwise the blocks are gathered from
        the memory map on the host (on a CPU, with the same draws as the lecture's in-memory
        tensor) and, for an accelerator, sent from pinned memory without blocking.
        """
        if not self._splits:
            self._load()
        n = n_batches * self.batch_size
        high = len(self._splits[split]) - self.block_size
        data = self._device_split(split, torch.device(device)) if device is not None else None
        if data is not None:
            gen_device = generator.device if generator is not None else data.device
            ix = torch.randint(high, (n,), generator=generator, device=gen_device).to(data.device)
            blocks = data[ix[:, None] + torch.arange(self.block_size + 1, device=data.device)].long()
        else:
            gen_device = generator.device if generator is not None else None
            ix = torch.randint(high, (n,), generator=generator, device=gen_device).cpu()
            offsets = ix.numpy()[:, None] + np.arange(self.block_size + 1)
            blocks = torch.from_numpy(self._splits[split][offsets])  # (N, block_size + 1), gathered from the map
            if device is not None and torch.device(device).type != "cpu":
                blocks = blocks.pin_memory().to(device, non_blocking=True)
            blocks = blocks.long()
        return blocks[:, :-1], blocks[:, 1:]

    def _device_split(self, split: str, device: torch.device) -> Optional[torch.Tensor]:
        """``split`` copied once to an accelerator, if the whole text fits there; None on a CPU
        (the memory map is already in host memory) and where it does not fit."""
        if device.type == "cpu":
            return None
        if (split, device) not in self._on_device:
            self._place(device, self._fits(device))
        return self._on_device[(split, device)]

    def _place(self, device: torch.device, fits: bool) -> None:
        """Both splits copied to ``device`` if ``fits``, else both left in host memory."""
        for split in SPLITS:
            self._on_device[(split, device)] = _to_device(self._splits[split], device) if fits else None

    def _fits(self, device: torch.device) -> bool:
        """Whether the text (both splits) takes at most DEVICE_SHARE of the accelerator's free memory."""
        if device.type != "cuda":
            return device.type != "cpu"
        n_bytes = sum(len(s) for s in self._splits.values()) * _device_dtype(self._splits["train"]).itemsize
        return n_bytes <= DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]

    def _process(self) -> tuple[int, int]:
        """(global rank, world size) of this process: (0, 1) outside a distributed run."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def check_processes(self, world_size: int) -> None:
        """Every process evaluates at least one batch of each split. The command line checks this
        before launching the processes (one error, not one per process); ``setup`` again, for
        launchers that start every process themselves (torchrun, SLURM)."""
        if self.eval_iters < world_size:
            raise UsageError(
                f"data.eval_iters ({self.eval_iters}) is smaller than the number of processes ({world_size}): "
                f"each process evaluates at least one batch of each split; set data.eval_iters to {world_size} or more."
            )

    def setup(self, stage: str) -> None:
        self._load()
        rank, world_size = self._process()
        self.check_processes(world_size)
        # The streams draw where the blocks are gathered: on the training device when the text
        # lives there (no host-device sync per step), on the CPU otherwise (as the lecture does).
        strategy = getattr(self.trainer, "strategy", None)
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        if device.type != "cpu":
            # One answer for every process, agreed here where all of them are: processes that
            # disagreed would draw with generators of different kinds, whose states (CUDA 16 bytes,
            # CPU 5056) then could not be gathered into a checkpoint: a hang.
            fits = self._fits(device)
            self._place(device, bool(steps.reduce(self.trainer, int(fits), "min")) if self.trainer else fits)
        on_device = [self._device_split(split, device) for split in SPLITS]  # copied now, if they fit
        self._generator_device = device if all(s is not None for s in on_device) else torch.device("cpu")
        # The sampler's streams derive from the run's seed (seed_everything) so runs repeat, and
        # from the process's rank: LightningCLI seeds every process alike, yet each must draw its own
        # blocks. A checkpoint's streams, restored by load_state_dict, take precedence.
        seed = torch.initial_seed()
        for name in STREAMS:
            if name not in self._generators:
                self._generators[name] = self._generator().manual_seed(stream_seed(seed, name, rank))

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self._generator_device)

    # Plain iterables of requests rather than DataLoaders: a request is a few bytes and its blocks
    # are drawn on the device, so worker processes would have nothing to do.
    def train_dataloader(self) -> Iterable[Request]:
        return _Endless()

    def val_dataloader(self) -> Iterable[Request]:
        return _Requests(self._eval_requests())

    def test_dataloader(self) -> Iterable[Request]:
        return self.val_dataloader()

    def _eval_requests(self) -> list[Request]:
        """This process's share of the ``eval_iters`` batches of each split, stacked into as few
        forward passes as memory allows. The shares add up to ``eval_iters``: more processes make
        the lecture's estimate faster, not larger."""
        rank, world_size = self._process()
        n_batches = self.eval_iters // world_size + (rank < self.eval_iters % world_size)
        per_forward = max(1, EVAL_TOKENS_PER_FORWARD // (self.batch_size * self.block_size))
        requests = []
        for split in SPLITS:
            for start in range(0, n_batches, per_forward):
                requests.append(Request(split, min(per_forward, n_batches - start)))
        return requests

    def on_after_batch_transfer(self, batch: Request, dataloader_idx: int):
        generator = self._generators["train" if self.trainer.training else "eval"]
        x, y = self.sample(batch.split, batch.n_batches, generator, self.trainer.strategy.root_device)
        return x, y, batch

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The vocabulary (so a checkpoint alone can decode) and the sampler's random streams.

        Under DDP only process 0's checkpoint is written, so every process's streams are gathered
        into it (``rank_generators``, indexed by global rank). Lightning builds the checkpoint on
        every process, which this collective relies on.
        """
        generators = {name: g.get_state() for name, g in self._generators.items()}
        state = {"vocab": self.tokenizer.chars, "generators": generators}
        if self._process()[1] > 1:
            state["rank_generators"] = self._gather(generators)
        return state

    def _gather(self, generators: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every process's stream states, by rank (states are equal-sized byte tensors)."""
        device = self.trainer.strategy.root_device  # NCCL gathers only tensors on the GPU
        world_size = self._process()[1]
        saved = [{} for _ in range(world_size)]
        for name, g_state in generators.items():
            states = [torch.empty_like(g_state, device=device) for _ in range(world_size)]
            torch.distributed.all_gather(states, g_state.to(device))
            for rank, rank_state in enumerate(states):
                saved[rank][name] = rank_state.cpu()
        return saved

    def load_state_dict(self, state: dict) -> None:
        """Each process resumes its own streams; with a different number of processes, process r
        continues saved stream r if there is one and otherwise keeps the fresh one ``setup`` seeded."""
        if state["vocab"] != self.tokenizer.chars:
            raise UsageError(
                f"the checkpoint's vocabulary ({len(state['vocab'])} characters) differs from that of "
                f"{self.data_path} ({self.vocab_size}): resume with the text it was trained on."
            )
        rank, world_size = self._process()
        saved = state.get("rank_generators") or [state["generators"]]
        if len(saved) != world_size:
            change = (
                f"processes {len(saved)} and up start fresh sampling streams from the seed"
                if world_size > len(saved)
                else f"the saved streams of processes {world_size} and up go unused"
            )
            rank_zero_warn(
                f"the checkpoint was written by {len(saved)} process(es) and this run has {world_size}: "
                f"{change}; the others continue their saved streams."
            )
        if rank >= len(saved):
            return
        for name, g_state in saved[rank].items():
            generator = self._generator()
            try:
                generator.set_state(g_state)
            except RuntimeError:  # a state of another kind of generator (CPU vs. CUDA)
                rank_zero_warn(
                    f"the checkpoint's {name!r} sampling stream was drawn on another kind of device than "
                    f"{self._generator_device.type}; this run starts that stream afresh from the seed."
                )
                continue
            self._generators[name] = generator


def _device_dtype(tokens: np.ndarray) -> torch.dtype:
    """uint8 ids stay uint8 on the device; wider ones become int32 (gathering wider unsigned types
    is not implemented everywhere in torch)."""
    return torch.uint8 if tokens.dtype == np.uint8 else torch.int32


def _to_device(tokens: np.ndarray, device: torch.device, chunk: int = 1 << 26) -> torch.Tensor:
    """A copy of a memory-mapped array on ``device``, sent in chunks so host memory stays bounded."""
    dtype = _device_dtype(tokens)
    out = torch.empty(len(tokens), dtype=dtype, device=device)
    for start in range(0, len(tokens), chunk):
        piece = np.array(tokens[start : start + chunk], dtype=np.uint8 if dtype == torch.uint8 else np.int32)
        out[start : start + len(piece)].copy_(torch.from_numpy(piece))
    return out
