"""Resume is exact, kills never corrupt last.ckpt, SIGTERM/Ctrl-C save, a NaN loss stops cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from nanogpt_pl.cli import cli, main
from nanogpt_pl.errors import UsageError

CONFIG = str(REPO / "configs" / "v7.yaml")  # the config with dropout: resume must restore its masks


def small_v7(data: Path, *extra: str, steps: int = 30, n_embd: int = 32, n_layer: int = 2) -> list[str]:
    """v7 shrunk to milliseconds per step, dropout kept, fp32, every step logged."""
    return [
        "--config", CONFIG, "--data.data_path", str(data),
        "--model.config.n_embd", str(n_embd), "--model.config.n_head", "2", "--model.config.n_layer", str(n_layer),
        "--data.block_size", "16", "--data.batch_size", "8", "--data.eval_iters", "3",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "10",
        "--trainer.precision", "32", "--trainer.accelerator", "cpu",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]


def popen_fit(args: list[str], cwd: Path) -> subprocess.Popen:
    """``python -m nanogpt_pl fit ARGS`` in the background; its stderr goes to ``cwd/stderr.txt``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(cwd / "stderr.txt", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "nanogpt_pl", "fit", *args],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )


def finish(process: subprocess.Popen, cwd: Path) -> str:
    """Wait for the process to exit; its stderr."""
    process.wait(timeout=120)
    return (cwd / "stderr.txt").read_text()


def wait_for(condition, process: subprocess.Popen, timeout: float = 120, poll: float = 0.001) -> None:
    """Poll ``condition`` until it holds; fail if the process exits or takes too long first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training exited (rc {process.returncode}) before the awaited moment")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(poll)


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every logged scalar by tag and step, over the run's event files (one per start of the run).

    A stopped run logs nothing after its checkpoint, so a resumed one that labels its steps as an
    uninterrupted run does never writes a label that an earlier file holds: each is checked once.
    """
    merged: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            points = {e.step: e.value for e in acc.Scalars(tag)}
            again = sorted(set(points) & set(merged.get(tag, {})))
            assert not again, f"{events.name} logs {tag} again at steps {again}"
            merged.setdefault(tag, {}).update(points)
    return merged


def assert_same_run(resumed: dict, uninterrupted: dict) -> None:
    for tag in ("train/loss", "train/loss_eval", "val/loss"):
        assert resumed[tag] == uninterrupted[tag], f"{tag} differs after resuming"


class SignalAt(Callback):
    """Sends ``signum`` to this process at ``step``: in the training step, or during its estimate."""

    def __init__(self, signum: int, step: int, during_estimate: bool) -> None:
        self.signum, self.step, self.during_estimate = signum, step, during_estimate

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.during_estimate and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, *args) -> None:
        if self.during_estimate and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_resume_is_exact_after_sigterm_ctrl_c_or_a_finished_run(small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", *small_v7(small_text)])
    expected = scalars(tmp_path / "tb_logs/v7/version_0")
    assert len(expected["train/loss"]) == 30 and len(expected["val/loss"]) == 3

    # A signal at the end of step 13 (after that step's stop decision) stops after step 14; one at
    # the end of step 20 or during step 10's estimate stops at the estimate's end, after it. Then
    # `--ckpt_path last` continues the same run to step 30.
    for signum, signalled, step, during_estimate in [
        (signal.SIGTERM, 13, 14, False), (signal.SIGINT, 20, 20, False), (signal.SIGTERM, 10, 10, True),
        (signal.SIGHUP, 5, 6, False),  # a closed terminal stops as SIGTERM does
    ]:
        run_dir = tmp_path / f"stopped_{step}"
        run_dir.mkdir()
        monkeypatch.chdir(run_dir)
        run = cli(small_v7(small_text), run=False)
        run.trainer.callbacks.append(SignalAt(signum, signalled, during_estimate))
        with pytest.raises(SystemExit):
            run.trainer.fit(run.model, datamodule=run.datamodule)
        assert f"stopped at step {step}; saved" in capsys.readouterr().err
        main(["fit", *small_v7(small_text), "--ckpt_path", "last"])
        assert f"done: steps {step}-30 in" in capsys.readouterr().out
        assert not (run_dir / "tb_logs/v7/version_1").exists(), "resuming continues the same run"
        assert_same_run(scalars(run_dir / "tb_logs/v7/version_0"), expected)

    # A run that finished at step 20 (its checkpoint written after that step's estimate), resumed to 30.
    monkeypatch.chdir(tmp_path / "stopped_20")
    shutil.rmtree("tb_logs")
    main(["fit", *small_v7(small_text, steps=20)])
    main(["fit", *small_v7(small_text), "--ckpt_path", "last"])
    assert_same_run(scalars(tmp_path / "stopped_20/tb_logs/v7/version_0"), expected)


def test_an_extended_run_logs_each_step_where_an_uninterrupted_run_does(small_text, tmp_path, monkeypatch, capsys):
    # Finished at step 25, whose final estimate is off val_check_interval (10), then extended to 30:
    # every later step keeps its label and the final estimate at 30 still runs.
    monkeypatch.chdir(tmp_path)
    main(["fit", *small_v7(small_text)])
    expected = scalars(tmp_path / "tb_logs/v7/version_0")
    (tmp_path / "extended").mkdir()
    monkeypatch.chdir(tmp_path / "extended")
    main(["fit", *small_v7(small_text, steps=25)])
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *small_v7(small_text), "--ckpt_path", "last"])
    captured = capsys.readouterr()
    # Continuing a run writes into its own checkpoint folder: expected, so not warned about.
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    extended = scalars(tmp_path / "extended/tb_logs/v7/version_0")
    assert extended["train/loss"] == expected["train/loss"]
    assert sorted(extended["val/loss"]) == [10, 20, 25, 30]
    assert "done: steps 25-30" in captured.out and "estimate train" in captured.out


def test_one_writer_per_run_folder_fresh_runs_included(small_text, tmp_path, monkeypatch, capsys):
    # A fresh run holds its new version folder from the start: neither `last` nor `auto` trains into
    # it while it runs, and another fresh run takes the next folder.
    running = popen_fit(small_v7(small_text, steps=100_000), tmp_path)
    folder = tmp_path / "tb_logs/v7/version_0"
    wait_for((folder / "checkpoints/last.ckpt").exists, running, poll=0.01)
    monkeypatch.chdir(tmp_path)
    try:
        for resume in ("last", "auto"):
            with pytest.raises(SystemExit):
                main(["fit", *small_v7(small_text, steps=2), "--ckpt_path", resume])
            assert f"in use by another run (PID {running.pid})" in capsys.readouterr().err
        main(["fit", *small_v7(small_text, steps=2)])
        assert sorted(p.name for p in (tmp_path / "tb_logs/v7").iterdir()) == ["version_0", "version_1"]
    finally:
        running.send_signal(signal.SIGTERM)
        finish(running, tmp_path)


def test_kills_during_saves_and_sigterm_leave_a_loadable_last_checkpoint(small_text, tmp_path, monkeypatch):
    # A checkpoint every step, of a model large enough (several MB with AdamW's state) that a
    # kill can be timed to land while one is being written.
    def args(steps: int) -> list[str]:
        return small_v7(
            small_text, "--checkpoint.every_n_train_steps", "1", "--checkpoint.monitor", "null",
            "--checkpoint.save_top_k", "0", "--trainer.val_check_interval", "1000",
            steps=steps, n_embd=128, n_layer=4,
        )

    checkpoints = tmp_path / "tb_logs/v7/version_0/checkpoints"
    last, partial = checkpoints / "last.ckpt", checkpoints / ".last.ckpt.partial"
    steps = []
    for round_ in range(3):
        proc = popen_fit(args(100_000) + (["--ckpt_path", "last"] if round_ else []), tmp_path)
        wait_for(lambda: steps_after(last, steps), proc, poll=0.01)  # this process has saved
        if round_ < 2:
            kill_during_save(proc, partial)
            assert partial.exists(), "the kill landed while a checkpoint was half written"
        else:
            proc.send_signal(signal.SIGTERM)
            err = finish(proc, tmp_path)
            assert proc.returncode == 1 and "saved" in err, err[-3000:]
        checkpoint = torch.load(last, weights_only=True)  # complete and readable
        assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
        steps.append(checkpoint["global_step"])

    monkeypatch.chdir(tmp_path)
    main(["fit", *args(steps[-1] + 2), "--ckpt_path", "last"])
    assert torch.load(last, weights_only=True)["global_step"] == steps[-1] + 2


def kill_during_save(process: subprocess.Popen, partial: Path) -> None:
    """SIGKILL the process while ``partial`` (a checkpoint being written) exists.

    The process is frozen with SIGSTOP first, so the check and the kill see the same moment: if
    the write finished in between, it is resumed and the next save is awaited.
    """
    while True:
        wait_for(partial.exists, process)  # a save is in progress
        process.send_signal(signal.SIGSTOP)
        if partial.exists():
            break
        process.send_signal(signal.SIGCONT)
    process.kill()
    process.wait()


def steps_after(last: Path, steps: list[int]) -> bool:
    """Whether ``last`` exists and is past the previous round's step (this round has trained and saved)."""
    if not last.exists():
        return False
    if not steps:
        return True
    try:
        return torch.load(last, weights_only=True, mmap=True)["global_step"] > steps[-1]
    except Exception:  # being replaced right now
        return False


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(small_text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli(small_v7(small_text, "--trainer.val_check_interval", "2", steps=10), run=False)
    training_step = run.model.training_step

    def poisoned(batch, batch_idx):
        loss = training_step(batch, batch_idx)
        return loss * float("nan") if run.trainer.global_step == 4 else loss  # the 5th step

    run.model.training_step = poisoned
    with pytest.raises(UsageError, match=r"not finite .* at step 5;.*last\.ckpt"):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    checkpoint = torch.load(tmp_path / "tb_logs/v7/version_0/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_fresh_fit_never_resumes_and_last_needs_a_checkpoint(small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *small_v7(small_text, steps=4), "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path last: no checkpoint matches tb_logs/v7/*/checkpoints/last*.ckpt" in err

    main(["fit", *small_v7(small_text, steps=4)])
    first = torch.load(tmp_path / "tb_logs/v7/version_0/checkpoints/last.ckpt", weights_only=True)
    # The same command again, in the same log directory: a new run from step 0 (the saved config
    # does not block it), and the first run's checkpoint is untouched.
    main(["fit", *small_v7(small_text, steps=4)])
    second = scalars(tmp_path / "tb_logs/v7/version_1")
    assert min(second["train/loss"].keys()) == 0 and (tmp_path / "tb_logs/v7/version_1/config.yaml").exists()
    again = torch.load(tmp_path / "tb_logs/v7/version_0/checkpoints/last.ckpt", weights_only=True)
    assert again["global_step"] == first["global_step"] == 4
    assert all(torch.equal(again["state_dict"][k], v) for k, v in first["state_dict"].items())


def test_each_process_draws_its_own_dropout_masks_fresh_and_resumed_on_more_processes():
    from types import SimpleNamespace

    from nanogpt_pl.run.resume import GlobalRandomState

    def started(rank: int, world_size: int, saved=None) -> GlobalRandomState:
        torch.manual_seed(1337)  # as LightningCLI seeds every process
        cpu = SimpleNamespace(root_device=torch.device("cpu"))
        trainer = SimpleNamespace(global_rank=rank, world_size=world_size, strategy=cpu)
        callback = GlobalRandomState()
        callback.setup(trainer, None, "fit")
        if saved is not None:
            callback.load_state_dict({"per_rank": saved})
        callback.on_train_start(trainer, None)
        callback.on_train_batch_start(trainer, None, None, 0)
        return callback

    draws = []
    for rank in (0, 1, 0):
        started(rank, 2)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    torch.manual_seed(1337)
    assert not torch.equal(draws[0], torch.rand(4)), "rank 0 draws from the run seed itself"

    # Two saved states, three processes: 0 and 1 continue theirs, 2 draws masks of its own.
    saved = [{"cpu": torch.Generator().manual_seed(s).get_state()} for s in (7, 8)]
    resumed = []
    for rank in range(3):
        with pytest.warns(UserWarning, match="random state of 2 processes, this run has 3"):
            started(rank, 3, saved)
        resumed.append(torch.rand(4))
    for rank in (0, 1):
        assert torch.equal(resumed[rank], torch.rand(4, generator=torch.Generator().set_state(saved[rank]["cpu"])))
    assert all(not torch.equal(resumed[2], other) for other in resumed[:2] + draws)


def test_a_stop_keeps_to_save_last_and_leaves_another_runs_last_checkpoint(small_text, tmp_path, monkeypatch, capsys):
    def stopped(*extra: str) -> str:
        run = cli(small_v7(small_text, *extra, steps=6), run=False)
        run.trainer.callbacks.append(SignalAt(signal.SIGTERM, 2, during_estimate=False))
        with pytest.raises(SystemExit):
            run.trainer.fit(run.model, datamodule=run.datamodule)
        return capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "last.ckpt").write_bytes(b"another run's")
    err = stopped("--checkpoint.dirpath", str(shared))
    assert "stopped at step 3; saved " in err and "last-v1.ckpt" in err, err
    assert (shared / "last.ckpt").read_bytes() == b"another run's"
    assert torch.load(shared / "last-v1.ckpt", weights_only=True)["global_step"] == 3

    (tmp_path / "off").mkdir()
    monkeypatch.chdir(tmp_path / "off")
    err = stopped("--checkpoint.save_last", "false")
    assert "stopped at step 3; checkpoint.save_last is off, so no checkpoint was written" in err, err
    assert not list((tmp_path / "off").rglob("last*.ckpt"))


def test_full_disk_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno as errno_module
    import io

    from nanogpt_pl.run.checkpoint import AtomicCheckpointIO
    from nanogpt_pl.errors import UsageError

    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    (tmp_path / ".last.ckpt.partial").write_bytes(b"left by a killed writer")
    io_plugin.save_checkpoint({"step": 1}, target)
    assert not (tmp_path / ".last.ckpt.partial").exists()
    previous = target.read_bytes()

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        """A disk that fills after 100 bytes; the in-memory size count still works."""
        if isinstance(f, io.BytesIO):
            return real_save(obj, f, *args, **kwargs)
        f.write(b"x" * 100)
        raise OSError(errno_module.ENOSPC, "No space left on device")

    monkeypatch.setattr("torch.save", full_disk)
    with pytest.raises(UsageError, match=rf"no space left in {tmp_path} .* bytes needed"):
        io_plugin.save_checkpoint({"step": 2}, target)
    assert target.read_bytes() == previous and not (tmp_path / ".last.ckpt.partial").exists()
