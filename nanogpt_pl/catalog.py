"""``configs``: what ships with the package, read from the configs themselves.

Each config's header states the lecture step it adds (its first line, ``# v2 — self-attention.``)
and its reference loss (``# target:``); its parameter count comes from building its model on the
meta device, which allocates no memory.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
import yaml

from nanogpt_pl import resources
from nanogpt_pl.data import CharDataModule
from nanogpt_pl.model import GPT, GPTConfig
from nanogpt_pl.reproduce import read_header


def configs() -> None:
    """List the shipped configs: name, the lecture step it adds, parameters, target loss.

    Run one with ``fit --config NAME`` (a file of that name in the working directory wins).
    """
    vocab_size = len(set(resources.data_file().read_text(encoding="utf-8")))
    rows = [("config", "adds", "parameters", "target")]
    for name, path in resources.shipped_configs().items():
        target = read_header(path)["target"] or {}
        rows.append(
            (
                name,
                _step(path),
                f"{_num_params(path, vocab_size):,}",
                ", ".join(f"{split} {loss:.4f}" for split, loss in target.items()) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"(from {resources.configs_dir()})")


def _step(path: Path) -> str:
    """``# v2 — self-attention. Token + ...`` -> ``self-attention`` (up to the first period or comma)."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    match = re.match(r"#\s*\S+\s+—\s*([^.,]*)", first)
    return match[1].strip() if match else "-"


def _num_params(path: Path, vocab_size: int) -> int:
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    block_size = (config.get("data") or {}).get("block_size")
    if block_size is None:
        block_size = inspect.signature(CharDataModule).parameters["block_size"].default
    model = (config.get("model") or {}).get("config") or {}
    with torch.device("meta"):
        return GPT(GPTConfig(**{**model, "vocab_size": vocab_size, "block_size": block_size})).num_params()
