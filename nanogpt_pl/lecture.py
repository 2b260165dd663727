"""The lecture's own formulation of the GPT: one module per head, each with its masked softmax.

This is the code of the "Let's build GPT" lecture, driven by the same ``GPTConfig`` as
``model.GPT``. It is not used for training: it is the reference the fast path (fused
key/query/value projection, ``scaled_dot_product_attention``) is tested against, and the
baseline the benchmark times. ``lecture_state_dict`` maps a ``GPT``'s weights (or gradients)
onto it, so both can run with identical parameters.

Module names follow the lecture and match ``model.GPT`` wherever the two agree, so the only
translation is the fused ``qkv`` matrix, split into per-head query/key/value projections.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogpt_pl.model import GPT, Block, GPTConfig, _init_normal


class Head(nn.Module):
    """One head of self-attention."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.key = nn.Linear(config.n_embd, config.head_dim, bias=config.bias)
        self.query = nn.Linear(config.n_embd, config.head_dim, bias=config.bias)
        self.value = nn.Linear(config.n_embd, config.head_dim, bias=config.bias)
        # The lecture stores the mask in every head; non-persistent here so state dicts match GPT's.
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)), persistent=False)
        self.scale_by = config.n_embd if config.attn_scale == "n_embd" else config.head_dim
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * self.scale_by**-0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # (B, T, T)
        wei = F.softmax(wei, dim=-1)  # (B, T, T)
        wei = self.dropout(wei)
        v = self.value(x)  # (B, T, hs)
        return wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)


class MultiHeadAttention(nn.Module):
    """Multiple heads of self-attention in parallel, their outputs concatenated."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = nn.ModuleList([Head(config) for _ in range(config.n_head)])
        if config.residual:
            self.proj = nn.Linear(config.attn_width, config.n_embd)
            self.dropout = nn.Dropout(config.dropout)
        else:
            self.proj = self.dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([h(x) for h in self.heads], dim=-1)  # (B, T, nh * hs)
        return self.dropout(self.proj(out))


class LectureGPT(GPT):
    """``GPT`` with the lecture's per-head attention blocks in place of the fused ones.

    Embeddings, ``ln_f``, ``lm_head``, ``forward`` and ``generate`` are GPT's own: only the
    attention differs, so a parity test isolates exactly the fast path.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        if not config.bigram:
            self.blocks = nn.Sequential(*(Block(config, MultiHeadAttention) for _ in range(config.n_layer)))
            if config.init == "normal":
                self.blocks.apply(_init_normal)

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "LectureGPT":
        """A lecture-formulation copy of ``gpt``: same config, same weights, same train/eval mode."""
        lecture = cls(gpt.config).to(next(gpt.parameters()).device)
        lecture.load_state_dict(lecture_state_dict(gpt.state_dict(), gpt.config))
        return lecture.train(gpt.training)


def lecture_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """``GPT``-named tensors (weights or gradients) renamed and split for ``LectureGPT``.

    The fused projection's rows are [queries | keys | values], each head's ``head_size`` rows
    contiguous within its third (the order ``MultiHeadAttention.forward`` unpacks them in).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        prefix, dot, kind = name.rpartition(".qkv.")
        if not dot:
            out[name] = tensor
            continue
        per_head = tensor.view(3, config.n_head, config.head_dim, *tensor.shape[1:])
        for h in range(config.n_head):
            for i, role in enumerate(("query", "key", "value")):
                out[f"{prefix}.heads.{h}.{role}.{kind}"] = per_head[i, h]
    return out


def lecture_gradients(gpt: GPT) -> dict[str, Optional[torch.Tensor]]:
    """``gpt``'s parameter gradients under ``LectureGPT``'s names, for comparison with its own."""
    return lecture_state_dict({n: p.grad for n, p in gpt.named_parameters()}, gpt.config)
