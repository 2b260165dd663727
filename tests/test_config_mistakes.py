"""Configuration mistakes Lightning or PyTorch would reject mid-run: one line, before the log folder exists."""

from __future__ import annotations

import os

import pytest

from conftest import REPO, TINY
from nanogpt_pl.cli import main


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.optimizer.init_args.lr", "-1"], "Invalid learning rate: -1.0"),
        (["--trainer.val_check_interval", "0"], "val_check_interval must be positive"),
        (["--trainer.accelerator", "gpu"], "gpu"),
        # Checked before Lightning launches the second process: one error, not one per process.
        (["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.eval_iters", "1"],
         "data.eval_iters (1) is smaller than the number of processes (2)"),
    ],
)
def test_mistake_is_one_line_and_writes_nothing(small_text, tmp_path, capsys, override, expected, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/v2.yaml"), "--data.data_path", str(small_text), *TINY, *override])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0]
    assert set(tmp_path.rglob("*")) == before


def test_reproduce_into_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--versions", "v2", "--out", str(taken)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("error:") == 1 and "is a file, not a folder" in err, err
    assert taken.read_text() == "not a folder" and list(tmp_path.iterdir()) == [taken]


def test_reproduce_into_a_folder_that_cannot_be_written_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--versions", "v2", "--out", "/proc/results"])  # refused even to root
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("error:") == 1 and "cannot write the results folder" in err, err


def test_a_config_from_a_pipe_trains_and_one_that_is_not_settings_is_one_line(small_text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    read, write = os.pipe()  # what `--config <(cat configs/v2.yaml)` hands over: /dev/fd/N
    os.write(write, (REPO / "configs/v2.yaml").read_bytes())
    os.close(write)
    try:
        main(["fit", "--config", f"/dev/fd/{read}", "--data.data_path", str(small_text), *TINY])
    finally:
        os.close(read)
    assert (tmp_path / "tb_logs/nanogpt/version_0/checkpoints/last.ckpt").exists()
    prose = tmp_path / "notes.txt"
    prose.write_text("These are notes about the run,\nnot a config at all.\n" * 50)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(prose), "--data.data_path", str(small_text), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "is not a config: it holds plain text" in err[0], err
