"""The GPT of "Let's build GPT", as one module whose flags replay the lecture step by step.

Pure ``torch.nn``: nothing here knows about Lightning, data files or the command line, so the
model can be imported, tested and reused on its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogpt_pl.errors import UsageError


@dataclass
class GPTConfig:
    """The whole description of a model. Each flag is one idea of the lecture."""

    vocab_size: int = 65
    """Number of distinct tokens (characters); set from the data's vocabulary."""
    block_size: int = 256
    """Longest context the model sees; set from ``data.block_size``."""
    bigram: bool = False
    """v1: logits are read straight from a vocab_size x vocab_size table; every other flag is unused."""
    n_embd: int = 384
    """Width of the token and position embeddings (the residual stream)."""
    n_head: int = 6
    """Attention heads per layer."""
    head_size: Optional[int] = None
    """Width of one head; default n_embd // n_head. v2 uses one head of 16 on n_embd 32."""
    n_layer: int = 6
    """Number of stacked blocks (attention, then feed-forward)."""
    ffn: bool = True
    """Feed-forward network after attention in each block (v3_ffn onwards)."""
    ffn_mult: int = 4
    """Hidden width of the feed-forward network, in multiples of n_embd (1 until v5, then 4)."""
    residual: bool = True
    """Residual connections, with an output projection after attention and feed-forward (v5)."""
    layer_norm: bool = True
    """Pre-LayerNorm before attention and feed-forward, and a final LayerNorm before lm_head (v6)."""
    dropout: float = 0.0
    """Dropout on attention weights, after projections and after the feed-forward network (v7)."""
    bias: bool = False
    """Bias in the key, query and value projections (the lecture has none)."""
    attn_scale: Literal["n_embd", "head_size"] = "head_size"
    """Attention scores scaled by n_embd**-0.5 (as the lecture ran) or head_size**-0.5 (the later fix)."""
    init: Literal["default", "normal"] = "default"
    """PyTorch's default init (as the lecture ran) or normal(0, 0.02) weights with zero biases."""
    # After the lecture: the changes small GPTs adopted since, each off by default (configs/v8_cpu.yaml).
    positions: Literal["learned", "rope"] = "learned"
    """Positions from a learned table added to the tokens (the lecture) or rotary embeddings of queries and keys (RoPE)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """The normalization layer_norm inserts: LayerNorm (the lecture) or RMSNorm (no mean subtracted, no bias)."""
    activation: Literal["relu", "gelu", "relu2"] = "relu"
    """The feed-forward network's non-linearity: ReLU (the lecture), GELU (GPT-2) or squared ReLU."""
    qk_norm: bool = False
    """Queries and keys RMS-normalized per head before their dot products, which bounds the attention logits."""
    zero_init_proj: bool = False
    """Output projections of attention and feed-forward start at zero, so every block starts as the identity."""
    tie_weights: bool = False
    """lm_head shares the token embedding's weights (GPT-2); the lecture has a separate lm_head."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layer", "ffn_mult"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise UsageError(
                    f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head}): "
                    "choose sizes that divide, or set head_size explicitly."
                )
        elif self.head_size < 1:
            raise UsageError(f"head_size must be a positive integer, got {self.head_size}.")
        if self.bigram:
            return
        if self.positions == "rope" and self.head_dim % 2:
            raise UsageError(
                f"positions: rope rotates pairs of a head's channels and needs an even head size, got {self.head_dim}."
            )
        if self.zero_init_proj and not self.residual:
            raise UsageError("zero_init_proj needs residual: true (only residual blocks have output projections).")
        if self.tie_weights and not (self.residual or self.ffn):
            raise UsageError(
                "tie_weights needs lm_head's input to be n_embd wide: turn on residual or ffn."
            )
        if self.attn_width != self.n_embd and (
            self.residual or self.ffn or self.layer_norm or self.n_layer > 1
        ):
            raise UsageError(
                f"n_head * head_size ({self.attn_width}) must equal n_embd ({self.n_embd}) unless the "
                "model is one attention layer with residual, ffn and layer_norm off."
            )
        if self.ffn and not self.residual and self.ffn_mult != 1:
            raise UsageError(
                f"ffn_mult {self.ffn_mult} needs residual: true (its projection maps the hidden width "
                "back to n_embd); use ffn_mult 1 without residual connections."
            )

    @property
    def head_dim(self) -> int:
        """The width of one head: ``head_size``, or its default n_embd // n_head."""
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def attn_width(self) -> int:
        """Width of the concatenated heads."""
        return self.n_head * self.head_dim


class MultiHeadAttention(nn.Module):
    """Causal self-attention, all heads at once.

    One fused key/query/value projection and ``scaled_dot_product_attention`` compute exactly
    what the lecture's list of single-head modules computes, in a few large kernels instead of
    several small ones per head, and without a stored mask (which would land in checkpoints).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_dim
        self.rope, self.qk_norm = config.positions == "rope", config.qk_norm
        self.qkv = nn.Linear(config.n_embd, 3 * config.attn_width, bias=config.bias)
        # The lecture's Head computes C**-0.5 with C the input width (n_embd); later code uses head_size.
        self.scale = (config.n_embd if config.attn_scale == "n_embd" else config.head_dim) ** -0.5
        self.attn_dropout = config.dropout
        # Set by ``GPT.attention_weights``: forward then keeps its (B, nh, T, T) weights in ``weights``.
        self.keep_weights = False
        self.weights: Optional[torch.Tensor] = None
        if config.residual:
            self.proj = nn.Linear(config.attn_width, config.n_embd)
            self.resid_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        else:
            self.proj = self.resid_dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, 3 * nh * hs) -> three tensors of (B, nh, T, hs); within each, heads are contiguous.
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4)
        if self.rope or self.qk_norm:  # queries and keys together: one operation each instead of two
            qk = qkv[:2]
            if self.qk_norm:  # unit-RMS queries and keys: the scores stay bounded however the weights grow
                qk = F.rms_norm(qk, (self.head_size,))
            if self.rope:  # positions enter as rotations of queries and keys: scores see only t - s
                qk = _rotate(qk, _rotary(T, self.head_size, x.device))
            (q, k), v = qk.unbind(0), qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.keep_weights:  # the weights are asked for: the same attention, with its softmax written out
            self.weights = _causal_attention_weights(q, k, self.scale)
            y = F.dropout(self.weights, dropout_p) @ v
        elif dropout_p and x.device.type == "cpu":
            y = _masked_softmax_attention(q, k, v, dropout_p, self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, nh * hs): heads concatenated
        return self.resid_dropout(self.proj(y))


@functools.lru_cache(maxsize=16)
def _rotary(T: int, head_size: int, device: torch.device) -> torch.Tensor:
    """RoPE's rotations for positions 0..T-1: (T, head_size / 2) unit complex numbers, base 10000 as in the paper.

    Cached per length and device rather than stored in the model, so checkpoints hold weights only,
    any length up to block_size works, and the layers of one forward share one computation.
    """
    inv_freq = 10000.0 ** -(torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, hs / 2)
    return torch.polar(torch.ones_like(angles), angles)


def _rotate(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i + 1]) of every head's channels by its position's angle: (..., T, hs).

    As complex numbers, one multiplication (and one in the backward pass) instead of a dozen real
    operations; in float32, since torch has no bfloat16 complex type.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., T, hs / 2)
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)


def _masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float
) -> torch.Tensor:
    """Causal attention with dropout on the attention weights, written out, for CPUs.

    ``scaled_dot_product_attention`` has no CPU kernel with dropout: it falls back to its math
    backend, which also computes bfloat16 inputs in float32. These few operations are the same
    computation and keep autocast's bfloat16 matrix multiplications, which cut v7's bf16-mixed
    training step on the development CPU by a third (docs/performance.md); in float32 they are
    no slower.
    """
    return F.dropout(_causal_attention_weights(q, k, scale), dropout_p) @ v  # (B, nh, T, hs)


def _causal_attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Each position's softmax over itself and the positions before it: (B, nh, T, T), rows sum to 1."""
    T = q.size(-2)
    att = (q * scale) @ k.transpose(-2, -1)  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    return att.masked_fill_(future, float("-inf")).softmax(dim=-1)


class ReLUSquared(nn.Module):
    """relu(x)**2 (Primer, So et al. 2021): sparse like ReLU, smooth at 0 like GELU; torch has no module for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "relu2": ReLUSquared}


class FeedForward(nn.Module):
    """Per-position MLP: a ReLU (or ``activation``) layer, plus its projection back to n_embd when residuals are on."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.ffn_mult * config.n_embd
        layers: list[nn.Module] = [nn.Linear(config.n_embd, hidden), ACTIVATIONS[config.activation]()]
        if config.residual:
            layers.append(nn.Linear(hidden, config.n_embd))
        if config.dropout:
            layers.append(nn.Dropout(config.dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Communication (attention) followed by computation (feed-forward).

    ``attention`` is the attention module's class: the fused one here, the lecture's per-head one
    in ``nanogpt_pl.lecture`` (the reference the fast path is tested against).
    """

    def __init__(self, config: GPTConfig, attention: type[nn.Module] = MultiHeadAttention) -> None:
        super().__init__()
        self.residual = config.residual
        norm = (lambda: _norm(config, config.n_embd)) if config.layer_norm else nn.Identity
        self.ln1, self.ln2 = norm(), norm()
        self.sa = attention(config)
        self.ffwd = FeedForward(config) if config.ffn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            x = x + self.sa(self.ln1(x))
            return x + self.ffwd(self.ln2(x))
        return self.ffwd(self.ln2(self.sa(self.ln1(x))))


class GPT(nn.Module):
    """A character-level GPT; ``GPTConfig`` decides which step of the lecture it is."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        if config.bigram:
            self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)
        else:
            self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
            if config.positions == "learned":
                self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
            self.blocks = nn.Sequential(*(Block(config) for _ in range(config.n_layer)))
            # Without residuals or feed-forward, the last layer's output is the concatenated heads.
            width = config.n_embd if (config.residual or config.ffn) else config.attn_width
            self.ln_f = _norm(config, width) if config.layer_norm else nn.Identity()
            self.lm_head = nn.Linear(width, config.vocab_size)
            if config.tie_weights:  # one (vocab_size, n_embd) matrix reads tokens in and writes logits out
                self.lm_head.weight = self.token_embedding_table.weight
        if config.init == "normal":
            self.apply(_init_normal)
        if config.zero_init_proj and not config.bigram:
            for block in self.blocks:
                for projection in (block.sa.proj, block.ffwd.net[2] if config.ffn else None):
                    if isinstance(projection, nn.Linear):
                        nn.init.zeros_(projection.weight)
                        nn.init.zeros_(projection.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits (B, T, vocab_size) for token ids ``idx`` (B, T); the mean cross-entropy if ``targets``."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise UsageError(f"sequence length {T} exceeds block_size {self.config.block_size}.")
        if self.config.bigram:
            logits = self.token_embedding_table(idx)  # (B, T, V)
        else:
            x = self.token_embedding_table(idx)  # (B, T, C)
            if self.config.positions == "learned":
                x = x + self.position_embedding_table(torch.arange(T, device=idx.device))  # + (T, C)
            x = self.blocks(x)  # (B, T, C)
            logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def attention_weights(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of ``idx`` (B, T) and, from the same forward, every layer's attention weights:
        (n_layer, B, n_head, T, T), row t the weights position t gives to positions 0..t."""
        if self.config.bigram:
            raise UsageError("a bigram model (v1) has no attention: its logits are read from a table; use v2 onwards.")
        modules = [block.sa for block in self.blocks]
        for module in modules:
            module.keep_weights = True
        try:
            logits, _ = self(idx)
            weights = torch.stack([module.weights for module in modules])
        finally:
            for module in modules:
                module.keep_weights, module.weights = False, None
        return logits, weights

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Extend ``idx`` (B, T) by sampling ``max_new_tokens`` tokens, one at a time.

        The context is cropped to the last ``block_size`` tokens, since the position table has
        no rows beyond it. ``generator`` makes sampling reproducible without touching the
        global random state.
        """
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, generator)], dim=1)

    @torch.no_grad()  # applied around each step of the generator, not while the caller holds it
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[torch.Tensor]:
        """``generate``, one step at a time: yields each new token (B, 1) as soon as it is drawn,
        so a caller can show text while the rest is still being sampled.

        Only the window the model reads, the last ``block_size`` tokens, is kept: each step costs the
        same time and memory however long the output already is (the caller keeps the text).
        """
        block_size = self.config.block_size
        idx = idx[:, -block_size:]
        for _ in range(max_new_tokens):
            logits, _ = self(idx)
            logits = logits[:, -1, :].float()  # (B, V)
            # Shifted so the largest is 0 before dividing: a tiny temperature then gives -inf for all
            # but the most likely token (greedy), a huge one gives zeros (uniform), never inf - inf = NaN.
            # (The temperature is clamped into float32's range, where 1e-300 would round to 0.)
            finfo = torch.finfo(logits.dtype)
            logits = (logits - logits.max(dim=-1, keepdim=True).values) / min(max(temperature, finfo.tiny), finfo.max)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)[:, -block_size:]  # (B, min(T + 1, block_size))
            yield idx_next


def _norm(config: GPTConfig, width: int) -> nn.Module:
    """The normalization ``layer_norm`` inserts, of ``norm``'s kind."""
    return nn.LayerNorm(width) if config.norm == "layernorm" else nn.RMSNorm(width)


def _init_normal(module: nn.Module) -> None:
    """GPT-2's init: N(0, 0.02) for weights and embeddings, zero biases (LayerNorms keep 1 and 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
