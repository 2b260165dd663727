"""Stops under DDP: one decision for every process, taken only at logging steps and estimates.

Two CPU processes over gloo. An uninterrupted run is the reference; the same run stopped by a
SIGTERM to process 0 alone (once while an estimate's checkpoints are written, once mid-interval)
and resumed twice must match it exactly. Every launch has a timeout: a hang fails the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import SHAKESPEARE, run_cli
from test_checkpointing import scalars, small_v7

STEPS, LOG_EVERY, EVAL_EVERY = 120, 20, 40
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
TIMEOUT = 240


def ddp_fit(cwd: Path, record: str, *extra: str, steps: int = STEPS):
    args = small_v7(
        cwd / "small.txt", *DDP, "--trainer.log_every_n_steps", str(LOG_EVERY),
        "--trainer.val_check_interval", str(EVAL_EVERY),
        "--trainer.callbacks+=tests.ddp_probe.Recorder", "--trainer.callbacks.out_dir", record,
        *extra, steps=steps,
    )
    result = run_cli("fit", *args, cwd=cwd, timeout=TIMEOUT)
    records = [torch.load(path) for path in sorted((cwd / record).glob("rank*.pt"))]
    return result, records


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp_reference")
    (cwd / "small.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    result, records = ddp_fit(
        cwd, "ref", "--trainer.callbacks+=tests.ddp_probe.CountCollectives", "--trainer.callbacks.out_dir", "ref"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(cwd=cwd, records=records, scalars=scalars(cwd / "tb_logs/v7/version_0"))


def test_no_collective_on_steps_that_do_not_log(reference):
    for rank in range(2):
        counted = json.loads((reference.cwd / "ref" / f"collectives{rank}.json").read_text())
        counts = {int(step): n for step, n in counted.items()}
        # The stop flag and the NaN verdict are exchanged at each logging step, and nowhere else
        # in training (Lightning's own per-batch SIGTERM broadcast is gone).
        assert sorted(counts) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), counts


def test_sigterm_to_process_0_stops_both_at_one_step_and_resumes_exactly(reference, tmp_path):
    (tmp_path / "small.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    last = tmp_path / "tb_logs/v7/version_0/checkpoints/last.ckpt"
    # Signalled while step 40's estimate writes its checkpoints, after that step's decision: both
    # stop at the next logging step, 60. Then signalled mid-interval, at step 70: both stop at 80.
    segments = [
        (("--trainer.callbacks+=tests.ddp_probe.SignalProcess0", "--trainer.callbacks.step", "40",
          "--trainer.callbacks.during", "checkpoint"), 60),
        (("--ckpt_path", "last", "--trainer.callbacks+=tests.ddp_probe.SignalProcess0",
          "--trainer.callbacks.step", "70"), 80),
        (("--ckpt_path", "last"), None),
    ]
    first = 0
    for i, (extra, stop) in enumerate(segments):
        result, records = ddp_fit(tmp_path, f"segment{i}", *extra)
        assert [r["stopped_at"] for r in records] == [stop, stop], result.stderr[-3000:]
        if stop is not None:
            assert result.returncode == 1 and f"stopped at step {stop}; saved" in result.stderr, result.stderr[-3000:]
            assert torch.load(last, weights_only=True)["global_step"] == stop  # complete, and this step's
        else:
            assert result.returncode == 0, result.stderr[-3000:]
        for rank, record in enumerate(records):
            assert sorted(record["train_batches"]) == list(range(first, stop or STEPS))
            for step, x in record["train_batches"].items():
                assert torch.equal(x, reference.records[rank]["train_batches"][step]), (rank, step)
        first = stop
    resumed = scalars(tmp_path / "tb_logs/v7/version_0")
    for tag in ("train/loss", "val/loss", "train/loss_eval"):
        assert resumed[tag] == reference.scalars[tag], tag


def test_nan_on_one_process_stops_both_with_the_one_line_error(tmp_path):
    (tmp_path / "small.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    result = run_cli("fit", *small_v7(
        tmp_path / "small.txt", *DDP, "--trainer.log_every_n_steps", "5",
        "--trainer.callbacks+=tests.ddp_probe.PoisonWeights", "--trainer.callbacks.rank", "1",
        "--trainer.callbacks.step", "7", steps=20,
    ), cwd=tmp_path, timeout=TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: the training loss is not finite (NaN or inf) at step 7;" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
