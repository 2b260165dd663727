"""Characters in, blocks of token ids out: the tokenizer and the lecture's random block sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import IterableDataset

from nanogpt_pl import resources
from nanogpt_pl.errors import UsageError

SPLITS = ("train", "val")
# The sampler's random streams: training batches, and evaluation batches (kept apart so that
# evaluating never shifts the training batches).
STREAMS = ("train", "eval")

# Evaluation stacks many of its random batches into one forward pass: the mean loss is the same
# (every batch has batch_size * block_size tokens) and a few large kernels beat many small ones.
# This caps the tokens per pass so memory stays bounded for large batch and block sizes.
EVAL_TOKENS_PER_FORWARD = 2**16


def read_text(path: Path, block_size: int, train_fraction: float) -> str:
    """The text of a data file, checked to be long enough for blocks in both splits.

    Every failure is one line that names the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file not found: {path} (set data.data_path to a UTF-8 text file).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"data file {path} is not UTF-8 text (byte {err.start}); convert it to UTF-8.") from None
    if not text:
        raise UsageError(f"data file {path} is empty; point data.data_path to a text to train on.")
    n_train = int(train_fraction * len(text))
    for split, length in (("train", n_train), ("val", len(text) - n_train)):
        if length < block_size + 1:
            raise UsageError(
                f"the {split} split of {path} has {length} characters, fewer than block_size + 1 = "
                f"{block_size + 1}: use a longer text or a smaller data.block_size."
            )
    return text


def vocab_size_of(data_path: str, block_size: int, train_fraction: float) -> int:
    """How many distinct characters a data file holds: the model's ``vocab_size``."""
    return len(set(read_text(data_path, block_size, train_fraction)))


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


def stream_seed(seed: int, stream: str, rank: int) -> int:
    """The seed of one process's sampling stream: every process draws its own blocks, and process 0
    draws those of a single-process run with the same seed."""
    return seed + STREAMS.index(stream) + len(STREAMS) * rank


class CharDataModule(L.LightningDataModule):
    """Any UTF-8 text file, split 90/10, served as random blocks of characters."""

    def __init__(
        self,
        data_path: str = str(resources.data_file()),
        block_size: int = 256,
        batch_size: int = 64,
        eval_iters: int = 200,
        train_fraction: float = 0.9,
    ) -> None:
        """
        Args:
            data_path: UTF-8 text file to train on; its sorted set of characters is the vocabulary.
            block_size: Characters per training example (the model's context length).
            batch_size: Random blocks per training step (per device).
            eval_iters: Random batches per split averaged into each train/val loss estimate.
            train_fraction: Leading fraction of the text used for training; the rest is validation.
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
        self._tokenizer: Optional[CharTokenizer] = None
        self._splits: dict[str, torch.Tensor] = {}
        self._generators: dict[str, torch.Generator] = {}

    # -- the text ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> CharTokenizer:
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _load(self) -> None:
        """Read, check and encode the text once."""
        text = read_text(self.data_path, self.block_size, self.train_fraction)
        tokenizer = CharTokenizer.from_text(text)
        data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        n = int(self.train_fraction * len(data))
        self._tokenizer, self._splits = tokenizer, {"train": data[:n], "val": data[n:]}

    # -- sampling ---------------------------------------------------------------------------
    def sample(
        self, split: str, n_batches: int = 1, generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_batches * batch_size`` random blocks of ``split``: x (N, block_size) and y, x shifted by one."""
        if not self._splits:
            self._load()
        data = self._splits[split]
        if device is not None and data.device != device:
            data = self._splits[split] = data.to(device)
        n = n_batches * self.batch_size
        ix = torch.randint(len(data) - self.block_size, (n,), generator=generator)
        offsets = ix.to(data.device)[:, None] + torch.arange(self.block_size + 1, device=data.device)
        blocks = data[offsets]  # (N, block_size + 1)
        return blocks[:, :-1], blocks[:, 1:]

    def _process(self) -> tuple[int, int]:
        """(global rank, world size) of this process: (0, 1) outside a distributed run."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str) -> None:
        self._load()
        rank, world_size = self._process()
        if self.eval_iters < world_size:
            raise UsageError(
                f"data.eval_iters ({self.eval_iters}) is smaller than the number of processes ({world_size}): "
                f"each process evaluates at least one batch of each split; set data.eval_iters to {world_size} or more."
            )
        # The sampler's streams derive from the run's seed (seed_everything) so runs repeat, offset
        # by the process's rank: LightningCLI seeds every process alike, yet each must draw its own
        # blocks. A checkpoint's streams, restored by load_state_dict, take precedence.
        seed = torch.initial_seed()
        for name in STREAMS:
            if name not in self._generators:
                self._generators[name] = torch.Generator().manual_seed(stream_seed(seed, name, rank))

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
            self._generators[name] = torch.Generator()
            self._generators[name].set_state(g_state)
