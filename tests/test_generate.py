"""``generate``: sampling from nothing but a checkpoint, reproducibly, with one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, fit_in
from nanogpt_pl.cli import main
from nanogpt_pl.data import CharTokenizer
from nanogpt_pl.generate import SAMPLE_SEPARATOR, sample
from nanogpt_pl.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """last.ckpt of a few steps of a small v7 (dropout on), written by the command line."""
    root = tmp_path_factory.mktemp("trained")
    fit_in(
        root, "--config", str(REPO / "configs/v7.yaml"),
        "--model.config.n_embd", "32", "--model.config.n_head", "2", "--model.config.n_layer", "2",
        "--data.block_size", "16", "--data.batch_size", "8", "--data.eval_iters", "2",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.precision", "32",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    )
    return root / "tb_logs/v7/version_0/checkpoints/last.ckpt"


def generate(capsys, *args: str) -> str:
    capsys.readouterr()
    main(["generate", *args])
    return capsys.readouterr().out


ROMEO = ["--prompt", "ROMEO:", "--max_new_tokens", "40", "--temperature", "0.8", "--top_k", "40", "--num_samples", "3"]


def test_a_cli_checkpoint_alone_generates_reproducibly(checkpoint, tmp_path, capsys):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(checkpoint, alone / "model.ckpt")  # no config, no data file, no log directory
    result = subprocess.run(
        [sys.executable, "-m", "nanogpt_pl", "generate", "--ckpt_path", "model.ckpt", *ROMEO, "--seed", "1"],
        cwd=alone, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    samples = result.stdout.rstrip("\n").split(f"\n{SAMPLE_SEPARATOR}\n")
    assert len(samples) == 3
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 40 for s in samples)
    assert len(set(samples)) == 3

    # The same seed gives the same text, in another process too; another seed, other text.
    assert generate(capsys, "--ckpt_path", str(alone / "model.ckpt"), *ROMEO, "--seed", "1") == result.stdout
    assert generate(capsys, "--ckpt_path", str(alone / "model.ckpt"), *ROMEO, "--seed", "2") != result.stdout


def test_an_empty_prompt_starts_from_a_newline(checkpoint, capsys):
    out = generate(capsys, "--ckpt_path", str(checkpoint), "--max_new_tokens", "7", "--seed", "0")
    assert out.startswith("\n") and len(out) == 1 + 7 + 1  # the newline, 7 characters, print's newline


def test_a_compiled_model_checkpoint_loads_the_same(checkpoint, tmp_path, capsys):
    # torch.compile wraps the module: its keys gain an "_orig_mod." segment.
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["state_dict"] = {k.replace("model.", "model._orig_mod.", 1): v for k, v in ckpt["state_dict"].items()}
    compiled = tmp_path / "compiled.ckpt"
    torch.save(ckpt, compiled)
    args = ["--max_new_tokens", "30", "--seed", "3"]
    original = generate(capsys, "--ckpt_path", str(checkpoint), *args)
    assert generate(capsys, "--ckpt_path", str(compiled), *args) == original


def bad_inputs(checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, foreign)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    ckpt = str(checkpoint)
    return {
        "prompt outside the vocabulary": (["--ckpt_path", ckpt, "--prompt", "ROMEO: ☃é"], "'é', '☃'; drop them"),
        "not this project's checkpoint": (["--ckpt_path", str(foreign)], "is not a nanogpt_pl checkpoint"),
        "truncated file": (["--ckpt_path", str(truncated)], "truncated, corrupt or not a checkpoint"),
        "text file": (["--ckpt_path", str(text)], "truncated, corrupt or not a checkpoint"),
        "missing file": (["--ckpt_path", str(tmp_path / "nope.ckpt")], "checkpoint not found"),
        "max_new_tokens 0": (["--ckpt_path", ckpt, "--max_new_tokens", "0"], "max_new_tokens must be at least 1"),
        "max_new_tokens < 0": (["--ckpt_path", ckpt, "--max_new_tokens", "-5"], "max_new_tokens must be at least 1"),
        "temperature 0": (["--ckpt_path", ckpt, "--temperature", "0"], "temperature must be positive"),
        "seed beyond 64 bits": (["--ckpt_path", ckpt, "--seed", str(2**64)], "seed must be an integer from 0"),
        "negative seed": (["--ckpt_path", ckpt, "--seed", "-1"], "seed must be an integer from 0"),
        "meta device": (["--ckpt_path", ckpt, "--device", "meta"], "not supported for sampling"),
        "mps device": (["--ckpt_path", ckpt, "--device", "mps"], "not supported for sampling"),
        "absent GPU": (["--ckpt_path", ckpt, "--device", "cuda:7"], "cuda:7"),
    }


def test_bad_input_is_one_line_and_a_nonzero_exit(checkpoint, tmp_path, capsys):
    for case, (args, expected) in bad_inputs(checkpoint, tmp_path).items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", *args])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert exit_info.value.code == 2, case
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (case, captured.err)
        assert captured.out == "", case


def test_sample_restores_training_mode_and_follows_its_generator():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_embd=8, n_head=2, n_layer=1, dropout=0.5))
    tokenizer = CharTokenizer("\nabcd")
    model.train()

    def draw(seed: int) -> list[str]:
        return sample(model, tokenizer, "ab", 10, top_k=3, num_samples=2, generator=torch.Generator().manual_seed(seed))

    first = draw(7)
    assert model.training  # usable in the middle of training
    assert first == draw(7) and all(s.startswith("ab") and len(s) == 12 for s in first)


@pytest.mark.parametrize("temperature", [1e-300, 1e300])
def test_extreme_temperatures_are_well_defined(temperature):
    from nanogpt_pl.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_layer=1)).eval()
    out = model.generate(torch.zeros(3, 1, dtype=torch.long), 5, temperature=temperature)
    assert out.shape == (3, 6) and int(out.min()) >= 0 and int(out.max()) < 11


def test_text_streams_as_it_is_generated_and_equals_the_batch_samples(checkpoint, monkeypatch):
    """Each character reaches stdout (flushed) as it is drawn; the printed text is the same as ``sample``'s."""

    class Recorder:
        def __init__(self) -> None:
            self.flushed: list[str] = []
            self._pending = ""

        def write(self, text: str) -> int:
            self._pending += text
            return len(text)

        def flush(self) -> None:
            self.flushed.append(self._pending)
            self._pending = ""

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    main(["generate", "--ckpt_path", str(checkpoint), *ROMEO, "--seed", "3", "--device", "cpu"])
    printed = "".join(out.flushed) + out._pending
    streamed = out.flushed[: 1 + 40]  # the prompt, then the first sample's 40 characters, one flush each
    assert streamed[0] == "ROMEO:" and all(len(piece) == 1 for piece in streamed[1:])

    from nanogpt_pl.generate import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint)
    samples = sample(model, tokenizer, "ROMEO:", 40, 0.8, 40, 3, torch.Generator().manual_seed(3))
    assert printed == f"\n{SAMPLE_SEPARATOR}\n".join(samples) + "\n"


def test_ctrl_c_while_sampling_is_one_line(checkpoint, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        yield ["ROMEO:"]
        raise KeyboardInterrupt

    monkeypatch.setattr("nanogpt_pl.generate.stream_samples", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt_path", str(checkpoint), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 130 and err.strip() == "error: interrupted (Ctrl-C).", err


def test_sampling_keeps_only_the_window_the_model_reads():
    # The same tokens as the lecture's loop (the whole output concatenated, cropped before each
    # step), while the tensor fed to the model never grows past block_size.
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_embd=16, n_head=2, n_layer=1)).eval()
    start = torch.zeros(2, 1, dtype=torch.long)
    held, cat = [], torch.cat

    def recording_cat(tensors, *args, **kwargs):
        result = cat(tensors, *args, **kwargs)
        held.append(result.size(-1))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "cat", recording_cat)
        new = list(model.stream(start, 40, generator=torch.Generator().manual_seed(3)))
    assert len(new) == 40 and max(held) <= 7, held  # the window and one new token, never the output
    out = torch.cat([start, *new], dim=1)
    idx, generator = start, torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(40):
            logits, _ = model(idx[:, -6:])
            probs = torch.softmax(logits[:, -1, :].float() - logits[:, -1, :].float().max(-1, keepdim=True).values, -1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
    assert torch.equal(out, idx)


def test_a_closed_pipe_ends_sampling_quietly(checkpoint, tmp_path):
    sampler = subprocess.Popen(
        [sys.executable, "-m", "nanogpt_pl", "generate", "--ckpt_path", str(checkpoint), "--max_new_tokens", "5000"],
        cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    sampler.stdout.read(10)  # what `| head -c 10` reads before it closes the pipe
    sampler.stdout.close()
    err = sampler.stderr.read().decode()
    assert sampler.wait(timeout=120) == 141 and err == "", err
