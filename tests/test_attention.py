"""Attention maps: the weights of the model's own forward, the ``attention`` command and TensorBoard's images."""

from __future__ import annotations


from pathlib import Path

import pytest
import torch

from conftest import REPO, fit_in
from nanogpt_pl.cli import main
from nanogpt_pl.model import GPT, GPTConfig
from test_reproduce import _png_size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few steps of a small v7_cpu (2 layers x 2 heads) logging its attention at every 2nd estimate."""
    root = tmp_path_factory.mktemp("attention")
    fit_in(
        root, "--config", str(REPO / "configs/v7_cpu.yaml"),
        "--model.config.n_embd", "32", "--model.config.n_head", "2", "--model.config.n_layer", "2",
        "--data.block_size", "16", "--data.batch_size", "8", "--data.eval_iters", "2",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "1", "--trainer.precision", "32",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--attention.every_n_estimates", "2",
    )
    return root / "tb_logs/v7_cpu/version_0"


def test_weights_are_causal_distributions_and_leave_the_logits_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_embd=24, n_head=3, n_layer=2, dropout=0.2)).eval()
    idx = torch.randint(0, 11, (2, 7))
    logits, weights = model.attention_weights(idx)
    assert weights.shape == (2, 2, 3, 7, 7)  # (n_layer, B, n_head, T, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 3, 7))
    past = torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.all(weights[..., ~past] == 0) and torch.all(weights[..., past] > 0)
    torch.testing.assert_close(logits, model(idx)[0])
    assert all(block.sa.weights is None and not block.sa.keep_weights for block in model.blocks)


def test_tensorboard_shows_the_figure_at_every_nth_estimate(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("attention")] == [2, 4]  # estimates at steps 1-4


def test_the_command_draws_a_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "attention.png"
    main(["attention", "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--prompt", "ROMEO:\nO me", "--out", str(out)])
    assert "2 layers x 2 heads over 11 characters" in capsys.readouterr().out
    width, height = _png_size(out)
    assert width > 300 and height > 300


def test_bad_input_is_one_line(run, tmp_path, capsys):
    ckpt = run / "checkpoints/last.ckpt"
    bigram = torch.load(ckpt, weights_only=True)
    config = {**bigram["hyper_parameters"]["config"], "bigram": True}
    bigram["hyper_parameters"]["config"] = config
    bigram["state_dict"] = {f"model.{k}": v for k, v in GPT(GPTConfig(**config)).state_dict().items()}
    torch.save(bigram, tmp_path / "v1.ckpt")
    cases = {
        "v1": (["--ckpt_path", str(tmp_path / "v1.ckpt")], "bigram model (v1): it has no attention"),
        "too long": (["--ckpt_path", str(ckpt), "--prompt", "x" * 17], "more than the model's block_size 16"),
        "vocabulary": (["--ckpt_path", str(ckpt), "--prompt", "ROMEO☃"], "not in the vocabulary"),
        "checkpoint": (["--ckpt_path", str(tmp_path / "nope.ckpt")], "checkpoint not found"),
    }
    for args, message in cases.values():
        with pytest.raises(SystemExit) as exit_info:
            main(["attention", *args, "--out", str(tmp_path / "a.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "a.png").exists()
    # Where the figure cannot go: nothing left behind, no .tmp either.
    (tmp_path / "folder").mkdir()
    for out, message in [("", "is not a file name"), (str(tmp_path / "folder"), "is not a file name"),
                         ("/proc/attention.png", "cannot write /proc/attention.png")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["attention", "--ckpt_path", str(ckpt), "--out", out])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "v1.ckpt"]
    assert not list((tmp_path / "folder").iterdir()) and not Path("/proc/attention.png.tmp").exists()
