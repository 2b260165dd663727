"""Sampling from a trained model: the lecture's ``generate``, from nothing but a checkpoint.

A checkpoint of ``fit`` carries the model's configuration (hyper-parameters, plain types) and the
vocabulary (in the datamodule's state), so it loads with ``torch.load(weights_only=True)`` and needs
no config file or data file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from nanogpt_pl.run.checkpoint import read_checkpoint
from nanogpt_pl.data import CharDataModule, CharTokenizer
from nanogpt_pl.errors import UsageError
from nanogpt_pl.model import GPT, GPTConfig

SAMPLE_SEPARATOR = "-" * 40


def model_state_dict(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``GPT``'s own weights from a ``GPTModule`` state dict.

    The one place that knows checkpoint key spellings: ``model.`` is the module's attribute, and
    ``torch.compile`` wraps a module so its keys gain an ``_orig_mod.`` segment; both are dropped.
    (Multi-GPU checkpoints need nothing: Lightning saves the unwrapped module's keys.)
    """
    weights = {}
    for key, value in module_state.items():
        key = key.replace("_orig_mod.", "")
        if key.startswith("model."):
            weights[key.removeprefix("model.")] = value
    return weights


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The model (in eval mode, on ``device``) and tokenizer of a ``fit`` checkpoint; one-line errors."""
    checkpoint = read_checkpoint(path)
    try:
        config = GPTConfig(**checkpoint["hyper_parameters"]["config"])
        tokenizer = CharTokenizer(checkpoint[CharDataModule.__qualname__]["vocab"])
        model = GPT(config)
        model.load_state_dict(model_state_dict(checkpoint["state_dict"]))
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise UsageError(
            f"{path} is not a nanogpt_pl checkpoint (it lacks this project's model configuration, "
            "vocabulary or weights): pass a .ckpt written by `python -m nanogpt_pl fit`."
        ) from None
    return model.to(device).eval(), tokenizer


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: Optional[int], num_samples: int) -> None:
    """One-line errors for sampling arguments that cannot work."""
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if not temperature > 0:
        raise UsageError(
            f"temperature must be positive, got {temperature} (e.g. 0.8; 1.0 samples the model's own distribution)."
        )
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k must be at least 1, got {top_k} (or leave it unset to sample from all tokens).")
    if num_samples < 1:
        raise UsageError(f"num_samples must be at least 1, got {num_samples}.")


def sample(
    model: GPT,
    tokenizer: CharTokenizer,
    prompt: str = "",
    max_new_tokens: int = 500,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (each returned with the prompt in front), drawn together.

    An empty prompt starts from token 0, as the lecture does (a newline, for Tiny Shakespeare).
    The model's train/eval mode is left as it was found, so this can run in the middle of training.
    """
    steps = stream_samples(model, tokenizer, prompt, max_new_tokens, temperature, top_k, num_samples, generator)
    return ["".join(pieces) for pieces in zip(*steps)]  # per step, one piece per sample: transposed


def stream_samples(
    model: GPT,
    tokenizer: CharTokenizer,
    prompt: str = "",
    max_new_tokens: int = 500,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Iterator[list[str]]:
    """``sample`` as it happens: first the start text, then each new character, one string per sample."""
    check_sampling_args(max_new_tokens, temperature, top_k, num_samples)
    ids = tokenizer.encode(prompt) or [0]
    device = next(model.parameters()).device
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    yield [tokenizer.decode(ids)] * num_samples
    was_training = model.training
    model.eval()
    try:
        for new in model.stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator):
            yield [tokenizer.decode(row) for row in new.tolist()]  # one host sync per character
    finally:
        model.train(was_training)


def generate(
    *,
    ckpt_path: str,
    prompt: str = "",
    max_new_tokens: int = 500,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    num_samples: int = 1,
    seed: Optional[int] = None,
    device: str = "auto",
) -> None:
    """Print text sampled from a checkpoint written by fit; it needs no other file.

    Args:
        ckpt_path: A .ckpt file written by fit (e.g. tb_logs/v7/version_0/checkpoints/last.ckpt).
        prompt: Text to continue; empty starts from a newline, as the lecture does.
        max_new_tokens: Characters to generate after the prompt, per sample.
        temperature: Divides the logits: below 1 is more conservative, above 1 more random.
        top_k: Sample only from the k most likely characters (all of them if unset).
        num_samples: Independent samples, printed one after another, separated by a line of dashes
            (the first appears as it is generated; the others, drawn alongside it, follow it).
        seed: Makes the samples reproducible (same seed, device and arguments: same text).
        device: Where to run: auto (a GPU if there is one), cpu, cuda, cuda:1, ...
    """
    check_sampling_args(max_new_tokens, temperature, top_k, num_samples)
    if seed is not None and not 0 <= seed < 2**64:
        raise UsageError(f"seed must be an integer from 0 to 2**64 - 1, got {seed}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device} is not supported for sampling: use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} requested but no CUDA GPU is available: use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    model, tokenizer = load_checkpoint(ckpt_path, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    # The samples are drawn together; the first is printed as it is generated, so a long sample shows
    # text at once, and the others, complete by then, follow it.
    others: list[list[str]] = [[] for _ in range(num_samples - 1)]
    for step in stream_samples(model, tokenizer, prompt, max_new_tokens, temperature, top_k, num_samples, generator):
        sys.stdout.write(step[0])
        sys.stdout.flush()
        for text, piece in zip(others, step[1:]):
            text.append(piece)
    for text in others:
        sys.stdout.write(f"\n{SAMPLE_SEPARATOR}\n{''.join(text)}")
    sys.stdout.write("\n")
    sys.stdout.flush()
