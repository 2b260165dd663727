"""Muon for the hidden matrices, AdamW for the rest: the split, the combined step, its checkpoint, its schedule."""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import replace

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO
from nanogpt_pl.cli import main
from nanogpt_pl.model import GPT, GPTConfig
from nanogpt_pl.optim import CombinedOptimizer, LinearWarmdown, hidden_matrices
from test_checkpointing import scalars

SMALL = GPTConfig(vocab_size=65, block_size=8, n_embd=32, n_head=4, n_layer=2, bias=True)


@pytest.mark.parametrize("tie_weights", [False, True])
def test_hidden_matrices_are_the_blocks_2d_weights_and_nothing_else(tie_weights):
    model = GPT(replace(SMALL, tie_weights=tie_weights))
    hidden, rest = hidden_matrices(model)
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden) == sorted(
        f"blocks.{i}.{layer}.weight" for i in range(2) for layer in ("sa.qkv", "sa.proj", "ffwd.net.0", "ffwd.net.2")
    )
    rest_names = {names[id(p)] for p in rest}
    assert {"token_embedding_table.weight", "blocks.0.ln1.weight", "blocks.0.sa.qkv.bias"} <= rest_names
    assert ("lm_head.weight" in rest_names) != tie_weights  # tied: the same tensor as the token table
    assert len(hidden) + len(rest) == len(list(model.parameters()))


def _optimizers(model: GPT) -> list[torch.optim.Optimizer]:
    hidden, rest = hidden_matrices(model)
    return [torch.optim.AdamW(rest, lr=1e-2), torch.optim.Muon(hidden, lr=0.05)]


def _train(model: GPT, optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(65, (4, 9), generator=generator)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_the_combined_optimizer_steps_as_its_members_and_resumes_exactly():
    torch.manual_seed(0)
    model = GPT(SMALL)
    apart = copy.deepcopy(model)
    members = _optimizers(apart)

    class Both:  # the members stepped one after the other, by hand
        def step(self):
            for optimizer in members:
                optimizer.step()

        def zero_grad(self):
            for optimizer in members:
                optimizer.zero_grad()

    combined = CombinedOptimizer(_optimizers(model))
    _train(model, combined, 3)
    _train(apart, Both(), 3)
    for a, b in zip(model.parameters(), apart.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Saved, loaded into fresh optimizers over a copy of the weights: the next steps are the same.
    state = combined.state_dict()
    assert [len(s["state"]) for s in state["optimizers"]] == [len(hidden_matrices(model)[1]), 8]
    resumed_model = copy.deepcopy(model)
    resumed = CombinedOptimizer(_optimizers(resumed_model))
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.param_groups[1] is resumed.optimizers[1].param_groups[0], "groups stay the members' own"
    _train(model, combined, 2, seed=1)
    _train(resumed_model, resumed, 2, seed=1)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    with pytest.raises(ValueError, match="not 2 optimizers"):
        resumed.load_state_dict(resumed.optimizers[0].state_dict())


@pytest.mark.parametrize("ns_steps", [5, 2])
def test_the_benchmarks_newton_schulz_flops_are_what_muon_computes(ns_steps):
    """benchmarks/after_lecture.py sets Muon's FLOPs beside the model's: counted here in torch's own
    Muon step, over matrices of both orientations (wide and tall)."""
    spec = importlib.util.spec_from_file_location("variants", REPO / "benchmarks" / "variants.py")
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    model = GPT(SMALL)
    hidden, rest = hidden_matrices(model)
    assert {p.shape[0] > p.shape[1] for p in hidden} == {True, False}
    optimizer = CombinedOptimizer([torch.optim.AdamW(rest), torch.optim.Muon(hidden, ns_steps=ns_steps)])
    _, loss = model(*torch.randint(65, (2, 2, 8)))
    loss.backward()
    with FlopCounterMode(display=False) as counter:
        optimizer.step()
    assert counter.get_total_flops() == variants.newton_schulz_flops(optimizer) > 0
    assert variants.newton_schulz_flops(torch.optim.AdamW(rest)) == 0


def test_linear_warmdown_moves_each_member_from_its_own_rate():
    model = GPT(SMALL)
    optimizer = CombinedOptimizer(_optimizers(model))
    scheduler = LinearWarmdown(optimizer, total_steps=10, warmdown=0.4, warmup_steps=2)
    rates = []
    for _ in range(11):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    factors = [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0]
    assert rates == [pytest.approx([1e-2 * f, 0.05 * f]) for f in factors]
    with pytest.raises(ValueError, match="warmdown"):
        LinearWarmdown(optimizer, total_steps=10, warmdown=1.5)


def small_v8(data, *extra: str, steps: int) -> list[str]:
    """configs/v8_cpu.yaml at milliseconds per step, every step logged."""
    return [
        "fit", "--config", str(REPO / "configs" / "v8_cpu.yaml"), "--data.data_path", str(data),
        "--model.config.n_embd", "32", "--model.config.n_layer", "2", "--data.block_size", "16",
        "--data.batch_size", "8", "--data.eval_iters", "2", "--trainer.val_check_interval", "4",
        "--trainer.max_steps", str(steps), "--model.lr_scheduler.init_args.total_steps", "10",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", *extra,
    ]


def test_muon_through_the_cli_resumes_exactly_and_schedules_both(small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(small_v8(small_text, steps=10))
    expected = scalars(tmp_path / "tb_logs/v8_cpu/version_0")
    adamw, muon = expected["lr-CombinedOptimizer/AdamW"], expected["lr-CombinedOptimizer/Muon"]
    # Constant, then down linearly over the last 70% (from step 3 of 10): each from its own rate.
    spec = yaml.safe_load((REPO / "configs" / "v8_cpu.yaml").read_text())["model"]
    rates = spec["optimizer"]["init_args"]["lr"], spec["hidden_optimizer"]["init_args"]["lr"]
    for step, factor in ((0, 1.0), (3, 1.0), (8, 2 / 7)):
        assert (adamw[step], muon[step]) == pytest.approx((rates[0] * factor, rates[1] * factor), rel=1e-6)

    (tmp_path / "resumed").mkdir()
    monkeypatch.chdir(tmp_path / "resumed")
    main(small_v8(small_text, steps=7))  # stopped in the warm-down
    main(small_v8(small_text, "--ckpt_path", "last", steps=10))
    resumed = scalars(tmp_path / "resumed/tb_logs/v8_cpu/version_0")
    # Every step's loss and both rates as in the uninterrupted run: both members' states came back.
    # (The finished 7-step run estimated at 7 too, drawing its own batches: later estimates differ.)
    for tag in ("train/loss", "lr-CombinedOptimizer/AdamW", "lr-CombinedOptimizer/Muon"):
        assert resumed[tag] == expected[tag], f"{tag} differs after resuming"
    assert sorted(resumed["val/loss"]) == [4, 7, 8, 10]

    # The other kind of optimizer state is refused in one line, before anything is built.
    capsys.readouterr()
    last = str(tmp_path / "resumed/tb_logs/v8_cpu/version_0/checkpoints/last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(small_v8(small_text, "--model.hidden_optimizer", "null", "--ckpt_path", last, steps=12))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained with a model.hidden_optimizer and this run has no one" in err


def test_a_bigram_has_no_hidden_matrices_for_muon(small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "v1", "--data.data_path", str(small_text),
              "--model.hidden_optimizer", "torch.optim.Muon", "--trainer.max_steps", "2"])
    assert "a bigram model (v1) has none" in capsys.readouterr().err
    assert not (tmp_path / "tb_logs/v1/version_0").exists()


V7_CPU_WITH_MUON = ["fit", "--config", str(REPO / "configs" / "v7_cpu.yaml"), "--model.hidden_optimizer",
                    "torch.optim.Muon", "--model.hidden_optimizer.init_args.lr", "0.02"]


@pytest.mark.parametrize(
    "args, message",
    [
        # torch.optim.Muon checks ns_steps only at its first step, after the run folder exists.
        (["--model.hidden_optimizer.init_args.ns_steps", "200"], "Muon ns_steps must be in 0..99, got 200"),
        # v7_cpu's schedule has one max_lr: Muon would train at AdamW's rate.
        (V7_CPU_WITH_MUON, "OneCycleLR sets one rate for both optimizers' groups"),
    ],
    ids=["ns_steps", "one_max_lr"],
)
def test_muon_mistakes_are_one_line_before_the_run_starts(args, message, small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if args[0] == "fit":
        args = [*args, "--data.data_path", str(small_text), "--trainer.max_steps", "2"]
    else:
        args = small_v8(small_text, *args, steps=2)
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("tb_logs/*/version_0"))
