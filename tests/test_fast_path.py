"""The fast path (fused key/query/value, scaled_dot_product_attention) equals the lecture's per-head formulation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import CONFIGS, LECTURE_CONFIGS
from nanogpt_pl.lecture import LectureGPT, lecture_gradients
from nanogpt_pl.model import GPT, GPTConfig, _masked_softmax_attention

TOL = dict(atol=1e-5, rtol=1e-5)
V7 = next(p for p in CONFIGS if p.stem == "v7")


def config_of(path, **changes) -> GPTConfig:
    """The model a config file describes, at its own block_size, with ``changes`` applied."""
    spec = yaml.safe_load(path.read_text())
    fields = {**spec["model"]["config"], "vocab_size": 65, "block_size": spec["data"]["block_size"]}
    return dataclasses.replace(GPTConfig(**fields), **changes)


def run(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("attn_scale", ["n_embd", "head_size"])
@pytest.mark.parametrize("path", LECTURE_CONFIGS, ids=[p.stem for p in LECTURE_CONFIGS])
def test_fast_path_equals_lecture_formulation(path, attn_scale, dropout):
    """Every config, both scalings, dropout in eval mode: the forward pass agrees to 1e-5 in fp32,
    and forward and gradients agree to 1e-5 in float64.

    Gradients are not compared element by element in fp32: a ReLU whose input lies within fp32
    rounding of zero can be off in one formulation and on in the other, and that jump of the
    derivative is an error of neither. In float64 no input comes that close at these sizes.
    """
    torch.manual_seed(0)
    config = config_of(path, attn_scale=attn_scale, dropout=dropout)
    fast = GPT(config).eval()  # eval: dropout is the identity in both, so they must agree exactly
    lecture = LectureGPT.from_gpt(fast)
    assert lecture.num_params() == fast.num_params()
    T = config.block_size
    idx = torch.randint(config.vocab_size, (1, T))  # one full-length block: the whole causal mask
    targets = torch.randint(config.vocab_size, (1, T))

    with torch.no_grad():
        torch.testing.assert_close(fast(idx, targets), lecture(idx, targets), **TOL)

    fast, lecture = fast.double(), lecture.double()
    fast_logits, fast_loss = run(fast, idx, targets)
    lecture_logits, lecture_loss = run(lecture, idx, targets)
    torch.testing.assert_close(fast_logits, lecture_logits, **TOL)
    torch.testing.assert_close(fast_loss, lecture_loss, **TOL)
    expected = {name: p.grad for name, p in lecture.named_parameters()}
    got = lecture_gradients(fast)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=lambda m: f"{name}: {m}")


def test_parity_test_notices_a_wrong_scaling():
    """The comparison is sharp: the two scalings differ, so a mix-up in either formulation fails."""
    torch.manual_seed(0)
    config = config_of(V7, n_layer=1, block_size=16, attn_scale="n_embd")
    fast = GPT(config).eval()
    lecture = LectureGPT.from_gpt(fast)
    lecture.blocks[0].sa.heads[0].scale_by = config.head_dim  # the config says n_embd
    idx = torch.randint(config.vocab_size, (2, 16))
    assert not torch.allclose(fast(idx)[0], lecture(idx)[0], **TOL)


@pytest.mark.parametrize("scale", [0.125, 0.05])
def test_cpu_dropout_attention_equals_sdpa(scale):
    """With attention dropout on a CPU the model writes attention out instead of calling SDPA:
    from the same random state it computes exactly what SDPA computes, dropout masks, output
    and gradients included (float64)."""
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.manual_seed(1)
    ours = _masked_softmax_attention(q, k, v, 0.3, scale)
    torch.manual_seed(1)
    sdpa = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True, scale=scale)
    torch.testing.assert_close(ours, sdpa, atol=1e-12, rtol=0)
    assert not torch.allclose(ours, _masked_softmax_attention(q, k, v, 0.0, scale))  # dropout was applied
    for got, expected in zip(torch.autograd.grad(ours.sum(), (q, k, v)), torch.autograd.grad(sdpa.sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_fast_path_is_causal_with_and_without_dropout_in_training():
    """In training mode (attention dropout drawn on the weights), no position sees a later one."""
    torch.manual_seed(0)
    config = config_of(V7, n_layer=2, block_size=32)
    assert config.dropout > 0
    model = GPT(config).train()
    idx = torch.randint(config.vocab_size, (1, 32))
    changed = idx.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % config.vocab_size
    torch.manual_seed(1)
    before = model(idx)[0]
    torch.manual_seed(1)
    after = model(changed)[0]
    torch.testing.assert_close(before[:, :20], after[:, :20])
    assert not torch.allclose(before[:, 20:], after[:, 20:])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_steps_with_fused_adamw(path):
    """The fast optimizer is the default a config states: one fused kernel over all parameters."""
    spec = yaml.safe_load(path.read_text())["model"]["optimizer"]
    assert spec["class_path"] == "torch.optim.AdamW"
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([parameter], **spec["init_args"])
    parameter.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.defaults["fused"] is True
