"""The GPT's behaviour: causality, what each flag builds, exact sizes, generation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import yaml

from conftest import CONFIGS
from nanogpt_pl.errors import UsageError
from nanogpt_pl.model import GPT, GPTConfig


def config_of(path, vocab_size: int = 65) -> GPTConfig:
    """The model a config file describes, with the block size its data section links in."""
    raw = yaml.safe_load(path.read_text())
    return GPTConfig(
        **raw["model"]["config"], vocab_size=vocab_size, block_size=raw["data"]["block_size"]
    )


def small(config: GPTConfig) -> GPTConfig:
    """The same architecture at a size that runs in milliseconds."""
    if config.bigram:
        return config
    return replace(config, n_embd=min(config.n_embd, 32), n_head=min(config.n_head, 4),
                   head_size=None if config.n_embd > 32 else config.head_size,
                   n_layer=min(config.n_layer, 2), block_size=min(config.block_size, 16))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_future_tokens_never_change_earlier_logits(path):
    torch.manual_seed(0)
    config = small(config_of(path))
    model = GPT(config).eval()
    T = config.block_size
    idx = torch.randint(config.vocab_size, (2, T))
    logits, _ = model(idx)
    for t in (0, T // 2, T - 2):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(config.vocab_size, (2, T - t - 1))
        new_logits, _ = model(changed)
        torch.testing.assert_close(new_logits[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(new_logits[:, t + 1 :], logits[:, t + 1 :])


EXPECTED_PARAMS = {
    "v1": 65 * 65,
    # token 65x32, position 8x32, k/q/v 32->16 without bias, lm_head 16->65
    "v2": 65 * 32 + 8 * 32 + 3 * 32 * 16 + 16 * 65 + 65,
    "v3": 65 * 32 + 8 * 32 + 3 * 32 * 32 + 32 * 65 + 65,
    "v3_ffn": 65 * 32 + 8 * 32 + 3 * 32 * 32 + (32 * 32 + 32) + 32 * 65 + 65,
    "v4": 65 * 32 + 8 * 32 + 3 * (3 * 32 * 32 + 32 * 32 + 32) + 32 * 65 + 65,
    "v5": 65 * 32 + 8 * 32 + 3 * (3 * 32 * 32 + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)) + 32 * 65 + 65,
    "v6": 42_369,
    "v7": 10_788_929,  # the lecture's figure
}


LECTURE_ROWS = [p for p in CONFIGS if p.stem in EXPECTED_PARAMS]


@pytest.mark.parametrize("path", LECTURE_ROWS, ids=lambda p: p.stem)
def test_parameter_counts_are_the_lectures(path):
    assert GPT(config_of(path)).num_params() == EXPECTED_PARAMS[path.stem]


def test_v6_adds_exactly_its_layer_norms_to_v5():
    v5 = GPT(config_of(next(p for p in CONFIGS if p.stem == "v5"))).num_params()
    # two LayerNorms per block (3 blocks) and a final one, each 2 x 32 parameters
    assert EXPECTED_PARAMS["v6"] == v5 + (3 * 2 + 1) * 2 * 32


BASE = GPTConfig(vocab_size=65, block_size=8, n_embd=32, n_head=4, n_layer=2, ffn=True,
                 ffn_mult=1, residual=False, layer_norm=False, dropout=0.0)


def module_types(model: torch.nn.Module) -> list[str]:
    return [f"{name}:{type(m).__name__}" for name, m in model.named_modules()]


@pytest.mark.parametrize(
    "change",
    [
        {"bigram": True},
        {"n_layer": 3},
        {"ffn": False},
        {"residual": True},
        {"residual": True, "ffn_mult": 4},
        {"layer_norm": True},
        {"dropout": 0.1},
        {"bias": True},
    ],
    ids=lambda c: ",".join(c),
)
def test_each_flag_changes_the_architecture(change):
    base, other = GPT(BASE), GPT(replace(BASE, **change))
    changed_tree = module_types(base) != module_types(other)
    changed_shapes = [p.shape for p in base.parameters()] != [p.shape for p in other.parameters()]
    assert changed_tree or changed_shapes
    if not set(change) <= {"dropout"}:  # dropout adds modules, not parameters
        assert base.num_params() != other.num_params()


@pytest.mark.parametrize("change", [{"attn_scale": "head_size"}, {"n_head": 2}], ids=lambda c: ",".join(c))
def test_same_weights_other_attention_other_output(change):
    """Flags that keep every parameter's shape still change what attention computes."""
    torch.manual_seed(0)
    a = GPT(replace(BASE, attn_scale="n_embd", n_head=4))
    b = GPT(replace(BASE, **{"attn_scale": "n_embd", "n_head": 4, **change}))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(65, (2, 8))
    assert not torch.allclose(a(idx)[0], b(idx)[0])


def test_normal_init_is_gpt2s():
    torch.manual_seed(0)
    model = GPT(replace(BASE, init="normal", n_embd=128, n_head=4))
    weight = model.blocks[0].sa.qkv.weight
    assert abs(weight.std().item() - 0.02) < 0.002
    assert torch.all(model.lm_head.bias == 0)
    torch.manual_seed(0)
    default = GPT(replace(BASE, n_embd=128, n_head=4)).blocks[0].sa.qkv.weight
    assert abs(default.std().item() - 0.02) > 0.01


def test_shapes_and_loss():
    model = GPT(BASE)
    idx = torch.randint(65, (3, 5))
    logits, loss = model(idx)
    assert logits.shape == (3, 5, 65) and loss is None
    _, loss = model(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # an untrained model is close to uniform over the vocabulary
    assert abs(loss.item() - torch.log(torch.tensor(65.0)).item()) < 1.0


def test_generate_crops_the_context_to_block_size():
    torch.manual_seed(0)
    model = GPT(BASE).eval()
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), max_new_tokens=20)
    assert out.shape == (2, 21)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = model.generate(torch.zeros(1, 1, dtype=torch.long), 10, top_k=5, generator=g1)
    b = model.generate(torch.zeros(1, 1, dtype=torch.long), 10, top_k=5, generator=g2)
    assert torch.equal(a, b)


def test_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = GPT(BASE).eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    out = model.generate(idx, 1, top_k=1)
    assert out[0, -1] == model(idx)[0][0, -1].argmax()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_embd": 30, "n_head": 4}, "not divisible by n_head"),
        ({"n_head": 1, "head_size": 16}, "must equal n_embd"),
        ({"ffn_mult": 4}, "needs residual"),
        ({"dropout": 1.5}, "dropout"),
        ({"n_layer": 0}, "n_layer"),
    ],
)
def test_impossible_configs_fail_with_one_sentence(kwargs, message):
    with pytest.raises(UsageError, match=message) as info:
        replace(BASE, **kwargs)
    assert "\n" not in str(info.value)


def test_v2_width_may_differ_from_n_embd():
    config = GPTConfig(vocab_size=65, block_size=8, n_embd=32, n_head=1, head_size=16, n_layer=1,
                       ffn=False, residual=False, layer_norm=False)
    assert GPT(config).lm_head.in_features == 16



# After the lecture: each change one flag, on a v6-like residual model (the only kind they apply to).
MODERN = replace(BASE, residual=True, layer_norm=True, ffn_mult=4)
ALL_MODERN = {"positions": "rope", "norm": "rmsnorm", "activation": "relu2", "qk_norm": True,
              "zero_init_proj": True, "tie_weights": True}


@pytest.mark.parametrize("name", ALL_MODERN)
def test_each_modern_flag_changes_what_the_model_is(name):
    torch.manual_seed(0)
    base = GPT(MODERN)
    other = GPT(replace(MODERN, **{name: ALL_MODERN[name]}))
    idx = torch.randint(65, (2, 8))
    if name == "positions":  # no position table: positions are rotations inside attention
        assert hasattr(base, "position_embedding_table") and not hasattr(other, "position_embedding_table")
    elif name == "norm":  # RMSNorm: a gain, no bias
        assert {type(m).__name__ for m in other.modules()} >= {"RMSNorm"}
        assert base.num_params() - other.num_params() == (2 * 2 + 1) * 32
    elif name == "tie_weights":
        assert other.lm_head.weight is other.token_embedding_table.weight
        assert base.num_params() - other.num_params() == 65 * 32
    elif name == "zero_init_proj":  # every block starts as the identity
        x = torch.randn(2, 8, 32)
        torch.testing.assert_close(other.blocks(x), x, rtol=0, atol=0)
    else:  # activation, qk_norm: same weights, other output
        other.load_state_dict(base.state_dict())
        assert not torch.allclose(base(idx)[0], other(idx)[0])


def test_the_modern_flags_keep_the_model_causal():
    torch.manual_seed(0)
    model = GPT(replace(MODERN, **{**ALL_MODERN, "zero_init_proj": False})).eval()  # non-trivial blocks
    idx = torch.randint(65, (2, 8))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 65
    new_logits, _ = model(changed)
    torch.testing.assert_close(new_logits[:, :5], logits[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(new_logits[:, 5:], logits[:, 5:])


def test_rope_scores_depend_only_on_relative_position():
    from nanogpt_pl.model import _rotary, _rotate

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rotations = _rotary(12, 8, torch.device("cpu"))

    def score(s: int, t: int) -> float:  # query at position s, key at position t
        return float((_rotate(q, rotations[s:s + 1]) * _rotate(k, rotations[t:t + 1])).sum())

    assert score(5, 2) == pytest.approx(score(9, 6), abs=1e-5) and score(5, 2) != pytest.approx(score(5, 4))
    # A rotation: each pair of channels keeps its length, and position 0 is not moved.
    torch.testing.assert_close(_rotate(q, rotations[7:8]).norm(), q.norm())
    torch.testing.assert_close(_rotate(q, rotations[:1]), q)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"positions": "rope", "n_head": 1, "head_size": 15, "n_layer": 1, "ffn": False}, "even head size"),
        ({"zero_init_proj": True}, "zero_init_proj needs residual"),
    ],
)
def test_impossible_modern_configs_fail_with_one_sentence(kwargs, message):
    with pytest.raises(UsageError, match=message):
        replace(BASE, **kwargs)


def test_a_checkpoint_of_the_modern_flags_resumes_and_generates_alone(small_text, tmp_path, monkeypatch, capsys):
    from nanogpt_pl.cli import main

    monkeypatch.chdir(tmp_path)
    flags = [f"--model.config.{name}={str(value).lower()}" for name, value in ALL_MODERN.items()]
    args = ["fit", "--config", "v7_cpu", "--data.data_path", str(small_text), "--trainer.val_check_interval", "2",
            "--data.eval_iters", "2", "--trainer.enable_progress_bar", "false", *flags]
    main([*args, "--trainer.max_steps", "4"])
    main([*args, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert "done: steps 4-6" in capsys.readouterr().out
    last = tmp_path / "tb_logs/v7_cpu/version_0/checkpoints/last.ckpt"
    main(["generate", "--ckpt_path", str(last), "--max_new_tokens", "20", "--seed", "1"])
    assert len(capsys.readouterr().out) == 1 + 20 + 1  # the start (a newline), 20 characters, a newline
