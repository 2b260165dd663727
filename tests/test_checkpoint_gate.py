"""Every --ckpt_path goes through one gate: one error line, nothing written, no pickle code run."""

from __future__ import annotations

import http.server
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch

from nanogpt_pl.cli import main
from conftest import REPO, TINY, fit_in, run_cli

V2 = ["--config", str(REPO / "configs/v2.yaml"), "--data.batch_size", "8", "--trainer.precision", "32"]


class Payload:
    """Unpickling this runs a command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small v2 run's folder, data file and last.ckpt (dropout 0)."""
    root = tmp_path_factory.mktemp("gate")
    text = fit_in(root, *V2, *TINY)
    return root, text, next(root.glob("tb_logs/v2/version_0/checkpoints/last.ckpt"))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _fails(capsys, root: Path, args: list[str]) -> str:
    """Runs ``main(args)`` in ``root``: exit 2, one error line, no traceback, no new file; the line."""
    before = _files(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert _files(root) == before
    return lines[0]


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_url_is_refused_and_never_unpickled(trained, capsys, tmp_path, command):
    root, text, _ = trained
    marker = tmp_path / "ran"
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps(Payload(marker)))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/evil.ckpt"
        line = _fails(capsys, root, [command, *V2, "--data.data_path", str(text), *TINY, "--ckpt_path", url])
    finally:
        server.shutdown()
    assert "URL" in line and not marker.exists()


def test_planted_last_does_not_run_under_force_no_weights_only(trained, tmp_path):
    root, text, last = trained
    folder = tmp_path / "tb_logs/v2/version_0/checkpoints"
    folder.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"x": Payload(marker)}, folder / "last.ckpt")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        result = run_cli("fit", *V2, "--data.data_path", str(text), *TINY, "--ckpt_path", "last", cwd=tmp_path)
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not marker.exists()


def test_bad_files(trained, capsys, tmp_path):
    root, text, last = trained
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:1000])
    plain = tmp_path / "plain.ckpt"
    torch.save({"weight": torch.zeros(2)}, plain)
    base = ["fit", *V2, "--data.data_path", str(text), *TINY]
    assert "cannot read" in _fails(capsys, root, [*base, "--ckpt_path", str(truncated)])
    assert "not a nanogpt_pl checkpoint" in _fails(capsys, root, [*base, "--ckpt_path", str(plain)])
    assert "not found" in _fails(capsys, root, [*base, "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert "directory" in _fails(capsys, root, [*base, "--ckpt_path", str(tmp_path)])


def test_another_model_vocabulary_or_block_size_is_refused(trained, capsys, tmp_path):
    root, text, last = trained
    line = _fails(capsys, root, ["validate", "--config", str(REPO / "configs/v6.yaml"), "--data.data_path",
                                 str(text), *TINY, "--ckpt_path", str(last)])
    assert "is a different model: n_head 1 in the checkpoint, 4 in the config" in line
    line = _fails(capsys, root, ["validate", *V2, "--data.data_path", str(text), *TINY, "--data.block_size", "4",
                                 "--ckpt_path", str(last)])
    assert "block_size 8 in the checkpoint, 4 in the config" in line
    other = tmp_path / "other.txt"
    other.write_text(text.read_text(encoding="utf-8").lower(), encoding="utf-8")
    line = _fails(capsys, root, ["validate", *V2, "--data.data_path", str(other), *TINY, "--ckpt_path", str(last)])
    assert "another vocabulary" in line


def test_dropout_follows_the_command_line_and_says_so(trained, capsys):
    root, text, last = trained
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["validate", *V2, "--data.data_path", str(text), *TINY, "--model.config.dropout", "0.1",
              "--ckpt_path", str(last)])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "replaces" in err and "dropout 0.0 -> 0.1" in err


def test_second_resume_of_a_folder_names_the_holder(trained, capsys):
    import subprocess
    import sys

    root, text, last = trained
    folder = last.parent.parent
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX);"
        "f.truncate(0); f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(60)"),
        str(folder / ".run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for resume in ("last", "auto"):  # auto too: a held folder is refused, never trained into afresh
            line = _fails(capsys, root, ["fit", *V2, "--data.data_path", str(text), *TINY, "--ckpt_path", resume])
            assert f"in use by another run (PID {holder.pid})" in line
    finally:
        holder.kill()
        holder.wait()
    from nanogpt_pl.run.folders import RunFolder

    RunFolder.lock(folder).release()  # the killed holder's lock is gone with it


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    text = fit_in(tmp_path, *V2, *TINY)
    lock = tmp_path / "tb_logs/v2/version_0/.run.lock"
    lock.unlink()
    lock.mkdir()  # the lock cannot be opened (as a read-only folder would refuse it)
    line = _fails(capsys, tmp_path, ["fit", *V2, "--data.data_path", str(text), *TINY, "--ckpt_path", "last"])
    assert "cannot write the run folder" in line and "version_0" in line


@pytest.mark.parametrize("mistake", [
    ["--model.optimizer.init_args.lr", "-1"],  # refused once the classes are built: after the claim
    ["--seed_everything", "-1"],
    ["--seed_everything", str(2**32)],
])
def test_a_refused_fit_leaves_no_run_folder(tmp_path, small_text, capsys, mistake):
    line = _fails(capsys, tmp_path, ["fit", *V2, "--data.data_path", str(small_text), *TINY, *mistake])
    assert ("seed_everything" in line) == ("--seed_everything" in mistake), line


def test_a_run_file_that_cannot_be_written_is_one_line_before_training(tmp_path, capsys):
    text = fit_in(tmp_path, *V2, *TINY)
    config = tmp_path / "tb_logs/v2/version_0/config.yaml"
    config.unlink()
    config.mkdir()  # Lightning's rewrite of config.yaml fails, as on a read-only file
    line = _fails(capsys, tmp_path, ["fit", *V2, "--data.data_path", str(text), *TINY, "--trainer.max_steps", "6",
                                     "--ckpt_path", "last"])
    assert "cannot write tb_logs/v2/version_0/config.yaml (Is a directory)" in line


def test_a_read_only_checkpoint_folder_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    text = fit_in(tmp_path, *V2, *TINY)
    checkpoints = tmp_path / "tb_logs/v2/version_0/checkpoints"
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):  # the OS's answer for a folder without write permission
        path = Path(os.path.abspath(path))
        unnamed = getattr(os, "O_TMPFILE", 0) and flags & os.O_TMPFILE == os.O_TMPFILE  # a file in folder `path`
        if (path == checkpoints and unnamed) or (path.parent == checkpoints and flags & os.O_CREAT):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    line = _fails(capsys, tmp_path, ["fit", *V2, "--data.data_path", str(text), *TINY, "--trainer.max_steps", "6",
                                     "--ckpt_path", "last"])
    assert "cannot write tb_logs/v2/version_0/checkpoints (Permission denied)" in line


def test_resuming_with_another_optimizer_is_refused_before_building(trained, capsys):
    root, text, last = trained
    line = _fails(capsys, root, ["fit", *V2, "--data.data_path", str(text), *TINY, "--ckpt_path", str(last),
                                 "--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.1"])
    assert f"{last} was trained with AdamW and this run has SGD" in line


def test_a_changed_optimizer_setting_on_resume_says_the_checkpoints_is_kept(trained, tmp_path, capsys):
    import shutil

    root, text, _ = trained
    shutil.copytree(root, tmp_path / "run")
    cwd = os.getcwd()
    os.chdir(tmp_path / "run")
    try:
        main(["fit", *V2, "--data.data_path", str(text), *TINY, "--trainer.max_steps", "6", "--ckpt_path", "last",
              "--model.optimizer.init_args.lr", "0.5"])
    finally:
        os.chdir(cwd)
    notes = [line for line in capsys.readouterr().err.splitlines() if "optimizer settings" in line]
    assert len(notes) == 1 and "AdamW lr 0.001 (this run: 0.5)" in notes[0], notes
    assert "start a new run (leave out --ckpt_path)" in notes[0]
