"""What a checkpoint is: the one gate every ``--ckpt_path`` passes, atomic writes, and ``last``.

- ``read_checkpoint`` / ``check_fits`` / ``check_optimizer*``: the gate, before anything is built or written.
- ``AtomicCheckpointIO``: a checkpoint appears complete under its name, or not at all.
- ``find_last_checkpoint``: what ``--ckpt_path last`` means on the command line.

A checkpoint is a pickle: loaded without ``weights_only=True`` it can run any code, so only local
files are read, and only with ``weights_only=True``. A checkpoint that loads must also be this
project's and fit the request: the data's vocabulary and block size, the config's architecture.
Fields that change parameter shapes must match; the others (dropout, ...) follow the command line.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import re
from pathlib import Path
from typing import Any, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins import TorchCheckpointIO

from nanogpt_pl.data import CharDataModule
from nanogpt_pl.errors import UsageError
from nanogpt_pl.model import GPTConfig
from nanogpt_pl.run.files import write_atomic

LAST = "last"  # ModelCheckpoint's name for the newest checkpoint: last.ckpt (last-v1.ckpt, ... on name clashes)

# GPTConfig fields that change no parameter's shape: the command line's values win over the checkpoint's.
FREE_FIELDS = ("dropout", "attn_scale", "init", "activation", "qk_norm", "zero_init_proj")

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A local checkpoint of ``fit``, loaded with ``weights_only=True``; every failure is one line."""
    if _URL.match(str(path)):
        raise UsageError(
            f"checkpoint {path} is a URL: checkpoints are read from local files only (a checkpoint is a "
            "pickle that could run code); download it, check where it came from, and pass the file."
        )
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise UsageError(
            f"checkpoint {what}: {path} (pass a .ckpt file written by fit, e.g. .../checkpoints/last.ckpt)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many kinds here: zip, pickle, EOF, OS and runtime errors
        raise UsageError(
            f"cannot read {path}: it is truncated, corrupt or not a checkpoint file; use another one "
            "(e.g. last.ckpt or a best-val checkpoint of the same run)."
        ) from None
    try:
        GPTConfig(**checkpoint["hyper_parameters"]["config"])
        str(checkpoint[CharDataModule.__qualname__]["vocab"])
        checkpoint["state_dict"].items()
    except (KeyError, TypeError, ValueError, AttributeError, UsageError):
        raise UsageError(
            f"{path} is not a nanogpt_pl checkpoint (it lacks this project's model configuration, "
            "vocabulary or weights): pass a .ckpt written by `python -m nanogpt_pl fit`."
        ) from None
    return checkpoint


def checkpoint_config(checkpoint: dict[str, Any]) -> GPTConfig:
    return GPTConfig(**checkpoint["hyper_parameters"]["config"])


def check_fits(path, checkpoint: dict[str, Any], config: GPTConfig, vocab: Optional[str]) -> list[str]:
    """Refuse a checkpoint whose shapes differ from ``config`` or whose vocabulary differs from the data's.

    Returns ``field: checkpoint value -> command-line value`` for each free field the run replaces.
    """
    saved = checkpoint_config(checkpoint)
    saved_vocab = checkpoint[CharDataModule.__qualname__]["vocab"]
    if vocab is not None and saved_vocab != vocab:
        only_data = "".join(sorted(set(vocab) - set(saved_vocab)))
        only_ckpt = "".join(sorted(set(saved_vocab) - set(vocab)))
        raise UsageError(
            f"{path} was trained on another vocabulary ({len(saved_vocab)} characters) than the data's "
            f"({len(vocab)}; only in the data: {only_data!r}, only in the checkpoint: {only_ckpt!r}): "
            "use the data file it was trained on."
        )
    differing, replaced = [], []
    for field in dataclasses.fields(GPTConfig):
        old, new = getattr(saved, field.name), getattr(config, field.name)
        if old == new:
            continue
        if field.name in FREE_FIELDS:
            replaced.append(f"{field.name} {old!r} -> {new!r}")
        else:
            differing.append(f"{field.name} {old!r} in the checkpoint, {new!r} in the config")
    if differing:
        raise UsageError(
            f"{path} is a different model: {'; '.join(differing)}. Use the config it was trained with "
            "(or set those values on the command line)."
        )
    return replaced


def check_optimizer(path, checkpoint: dict[str, Any], hidden_optimizer: bool) -> None:
    """``fit``: refuse to continue with one optimizer a run trained with two (``model.hidden_optimizer``),
    or the reverse; the optimizer's state would not load, and only after the model was built."""
    states = checkpoint.get("optimizer_states") or [{}]
    saved = isinstance(states[0], dict) and "optimizers" in states[0]
    if saved != hidden_optimizer:
        had, has = ("a", "no") if saved else ("no", "a")
        raise UsageError(
            f"{path} was trained with {had} model.hidden_optimizer and this run has {has} one: continue it "
            "with the config it was trained with, or leave out --ckpt_path to start a new run."
        )


# Optimizer settings a resume cannot take from the command line: Lightning loads the checkpoint's
# param_groups whole. ``initial_lr`` is the schedule's base rate; ``lr`` then is the scheduled one.
_NOT_SETTINGS = ("params", "initial_lr", "lr")


def saved_optimizers(checkpoint: dict[str, Any]) -> list[tuple[Optional[str], list[dict]]]:
    """Each optimizer a checkpoint holds the state of: its class name (recorded since this release;
    None before) and its param_groups without the parameters."""
    states = (checkpoint.get("optimizer_states") or [{}])[0]
    members = states.get("optimizers", [states]) if isinstance(states, dict) else []
    names = checkpoint.get("optimizer_names") or [None] * len(members)
    return [
        (name, [{k: v for k, v in group.items() if k != "params"} for group in member.get("param_groups", [])])
        for name, member in zip(names, members)
    ]


def check_optimizer_settings(path, saved: list[tuple[Optional[str], list[dict]]], optimizers: list) -> list[str]:
    """``fit --ckpt_path``: refuse an optimizer of another class than the checkpoint's (its state would
    not load, or would load into the wrong update rule); return the settings the resume keeps from
    the checkpoint where this run asks for others, as ``name setting: saved (this run: asked)``."""
    ignored = []
    for (saved_name, saved_groups), optimizer in zip(saved, optimizers):
        name = type(optimizer).__name__
        groups = optimizer.param_groups
        saved_keys = set(saved_groups[0]) - set(_NOT_SETTINGS) if saved_groups else set()
        keys = set(groups[0]) - set(_NOT_SETTINGS)
        if (saved_name or name) != name or saved_keys != keys or len(saved_groups) != len(groups):
            was = saved_name or f"another optimizer (with {', '.join(sorted(saved_keys - keys)) or 'other parameter groups'})"
            raise UsageError(
                f"{path} was trained with {was} and this run has {name}: its optimizer state cannot continue "
                f"in {name}. Continue it with the optimizer it was trained with, or leave out --ckpt_path to "
                "start a new run."
            )
        for i, (old, new) in enumerate(zip(saved_groups, groups)):
            rate = "initial_lr" if "initial_lr" in old and "initial_lr" in new else "lr"
            for key in sorted(keys | {rate}):
                before, after = _plain(old.get(key)), _plain(new.get(key))
                if before != after:
                    setting = f"{name} {key if key != 'initial_lr' else 'lr'}"
                    entry = f"{setting} {before!r} (this run: {after!r})"
                    if not any(e.startswith(f"{setting} ") for e in ignored):  # once per setting
                        ignored.append(entry)
    return ignored


def _plain(value):
    """Values as a saved and a fresh param_group compare them: tuples and lists alike, tensors as numbers."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in its own directory, then renames it into place.

    A rename within one directory is atomic, so a process killed at any moment leaves either the
    previous complete ``last.ckpt`` or the new one. (Lightning's default stages the file in the
    system temp directory, whose move onto another file system is a copy that a kill can cut short.)
    Remote paths keep Lightning's own writer.
    """

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        """Always ``weights_only=True`` and local: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` or a URL must not
        let a planted checkpoint run code (the CLI's checkpoint gate has checked the file already)."""
        if not isinstance(get_filesystem(path), LocalFileSystem):
            raise UsageError(f"checkpoint {path} is not a local file: download it and pass the file.")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as RuntimeError
            if not _disk_full(err):
                if isinstance(err, OSError):
                    raise UsageError(
                        f"cannot write the checkpoint {path} ({err.strerror or err}): make {path.parent} "
                        "writable or choose another --checkpoint.dirpath; the previous checkpoint is intact."
                    ) from None
                raise
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            raise UsageError(
                f"no space left in {path.parent} to save {path.name} ({buffer.tell():,} bytes needed); "
                "free space there and resume with --ckpt_path last (the previous checkpoint is intact)."
            ) from None


def _disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err) or (
        "inline_container" in str(err)
    )


class NoCheckpoint(UsageError):
    """``--ckpt_path last`` found nothing to continue (``auto`` then starts afresh)."""


def find_last_checkpoint(directory: Path, subdirectories: str = "") -> Path:
    """The most recently written ``last*.ckpt`` in ``directory`` (or in its ``subdirectories`` pattern).

    On the command line the directory is the logger's ``<save_dir>/<name>`` (``tb_logs/v2``) and the
    pattern ``*/checkpoints/``: every fresh ``fit`` gets a new version folder there, and
    ``--ckpt_path last`` picks the run whose ``last.ckpt`` was written last.
    """
    pattern = f"{subdirectories}{LAST}*.ckpt"
    candidates = list(directory.glob(pattern)) if directory.is_dir() else []
    if not candidates:
        raise NoCheckpoint(
            f"--ckpt_path last: no checkpoint matches {directory / pattern}; start a fresh run without "
            "--ckpt_path, or pass the path of a .ckpt file."
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)
