"""The command line as users run it: every config trains, configs round-trip, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, SHAKESPEARE, TINY, run_cli
from nanogpt_pl.cli import main


def shrink(path: Path) -> list[str]:
    """Overrides that keep a config's architecture but make v7-sized models cheap on a CPU."""
    raw = yaml.safe_load(path.read_text())
    if raw["data"]["block_size"] <= 8:
        return []
    return ["--data.block_size", "16", "--data.batch_size", "4", "--model.config.n_layer", "2"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_trains_a_few_steps(path, small_text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(path), "--data.data_path", str(small_text), *TINY, *shrink(path)])
    run = tmp_path / "tb_logs" / path.stem / "version_0"
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"
    checkpoints = list(run.rglob("*.ckpt"))
    assert checkpoints, "no checkpoint"
    ckpt = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] in (2, 4)  # an evaluation step
    assert ckpt["hyper_parameters"]["config"]["vocab_size"] == len(set(small_text.read_text()))


def test_final_estimate_is_logged_at_the_last_step_off_the_interval(small_text, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS[1]), "--data.data_path", str(small_text), *TINY]
    main(args + ["--trainer.max_steps", "5"])  # estimates after steps 2, 4 and the last, 5
    events = EventAccumulator(str(next((tmp_path / "tb_logs").rglob("version_0"))))
    events.Reload()
    assert len(events.Scalars("val/loss")) == 3
    assert len(events.Scalars("train/loss_eval")) == 3


def test_print_config_round_trips(small_text, tmp_path):
    args = ["--config", str(CONFIGS[-1]), "--data.data_path", str(small_text)]
    first = run_cli("fit", *args, "--print_config", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    saved = tmp_path / "printed.yaml"
    saved.write_text(first.stdout)
    second = run_cli("fit", "--config", str(saved), "--print_config", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def write(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


BAD_INPUTS = {
    "missing data file": (lambda t: ["--data.data_path", str(t / "nope.txt")], "data file not found"),
    "empty data file": (lambda t: ["--data.data_path", write(t, "e.txt", "")], "is empty"),
    "text shorter than a block": (
        lambda t: ["--data.data_path", write(t, "s.txt", "To be or not to be" * 4)], "fewer than block_size"),
    "n_embd not divisible by n_head": (
        lambda t: ["--model.config.n_head", "5", "--model.config.head_size", "null"], "not divisible by n_head"),
    "unknown config key": (lambda t: ["--model.config.n_embed", "64"], "n_embed"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(name, tmp_path):
    extra, message = BAD_INPUTS[name]
    work = tmp_path / "work"
    work.mkdir()
    base = ["--config", str(CONFIGS[2]), "--data.data_path", str(SHAKESPEARE), *TINY]
    result = run_cli("fit", *base, *extra(tmp_path), cwd=work)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert list(work.iterdir()) == [], "a failed start left files behind"


def test_validate_and_test_rerun_the_estimate_from_a_checkpoint(small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS[2]), "--data.data_path", str(small_text), *TINY]
    main(["fit", *args])
    ckpt = next((tmp_path / "tb_logs").rglob("*.ckpt"))
    for subcommand in ("validate", "test"):
        capsys.readouterr()
        main([subcommand, *args, "--ckpt_path", str(ckpt)])
        out = capsys.readouterr().out
        assert "val/loss" in out and "train/loss_eval" in out


def test_a_typed_value_that_does_not_parse_is_one_line(capsys):
    # jsonargparse spreads this complaint over two lines; the command line prints one.
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "--prune", "maybe"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and 'Parser key "prune"' in err, err
