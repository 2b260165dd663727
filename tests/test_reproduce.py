"""``reproduce``: one tiny run end to end, its three outputs agreeing, and its input checks."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_cli
from nanogpt_pl.cli import main
from nanogpt_pl.reproduce import read_header, read_scalars


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def test_reproduce_writes_consistent_results(tmp_path):
    out = tmp_path / "results"
    result = run_cli(
        "reproduce", "--versions", "v2", "--seeds", "3", "--max_steps", "4", "--eval_iters", "2",
        "--out", str(out), "--configs", str(REPO / "configs"), cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"\[1/1\] v2 seed 3: step 4/4, val \d", result.stdout), result.stdout

    records = json.loads((out / "results.json").read_text())
    assert list(records) == ["v2"]
    record = records["v2"]
    assert record["target"] == read_header(REPO / "configs" / "v2.yaml")["target"] == {"val": 2.4084}
    assert record["steps"] == 4 and [run["seed"] for run in record["seeds"]] == [3]
    assert record["torch"] and record["lightning"] and record["device"]
    run = record["seeds"][0]
    assert record["val"] == {"mean": round(run["val"], 4), "min": run["val"], "max": run["val"]}

    # The figures are TensorBoard's: the run's event file holds the same final estimates.
    scalars = read_scalars(out / "runs" / "v2" / "seed3")
    assert scalars["val/loss"][-1][1] == run["val"] and scalars["train/loss_eval"][-1][1] == run["train"]
    assert run["val_curve"] == scalars["val/loss"]

    # The table shows the same numbers, and names the versions not run.
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| `v2`"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "2.4084" and cells[2] == f"{record['val']['mean']:.4f}"
    assert cells[4] == f"{record['val']['mean'] - 2.4084:+.4f}"
    assert "| `v7` | 1.4873 | not yet run on a GPU |" in table
    assert "--versions v2 --seeds 3 --max_steps 4 --eval_iters 2" in table

    width, height = _png_size(out / "val_loss.png")
    assert width > 300 and height > 200
    assert _png_size(out / "after_lecture.png") == (width, height)  # no version of that path run: empty axes

    # The gallery: a fixed-seed text from the first seed's last.ckpt, in results.json and samples.md.
    gallery = record["sample"]
    assert gallery["checkpoint"] == "runs/v2/seed3/checkpoints/last.ckpt" and (out / gallery["checkpoint"]).is_file()
    assert len(gallery["text"]) == gallery["max_new_tokens"] == 300
    samples = (out / "samples.md").read_text()
    assert "## `v2`" in samples and f"```text\n{gallery['text']}\n```" in samples

    # --samples_only: a record without a sample still loads, and gets the same text back from the
    # checkpoint, without training (the run's event files are untouched).
    del records["v2"]["sample"]
    (out / "results.json").write_text(json.dumps(records))
    events = sorted((out / "runs" / "v2" / "seed3").glob("events.*"))
    main(["reproduce", "--samples_only", "true", "--versions", "v2", "--out", str(out), "--configs", str(REPO / "configs")])
    assert json.loads((out / "results.json").read_text())["v2"]["sample"] == gallery
    assert (out / "samples.md").read_text() == samples
    assert sorted((out / "runs" / "v2" / "seed3").glob("events.*")) == events


def test_samples_only_needs_the_reproductions_checkpoints(tmp_path, capsys):
    record = {"seeds": [{"seed": 5}], "val": {"mean": 2.0}}
    (tmp_path / "results.json").write_text(json.dumps({"v2": record}))
    for versions, message in (("v3", "no record of v3"), ("v2", "checkpoint not found")):
        with pytest.raises(SystemExit) as exit_info:
            main(["reproduce", "--samples_only", "true", "--versions", versions, "--out", str(tmp_path),
                  "--configs", str(REPO / "configs")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--versions", "v9"], "unknown version(s) v9: choose from v1, v2"),
        (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
        (["--seeds", "1,1"], "--seeds must list distinct integers"),
        (["--versions", "v2", "--max_steps", "0"], "--max_steps must be a positive integer"),
    ],
)
def test_reproduce_rejects_bad_input_before_training(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--out", str(tmp_path / "out"), "--configs", str(REPO / "configs"), *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_a_damaged_results_file_before_training(tmp_path, capsys):
    (tmp_path / "results.json").write_text("[1, 2")
    with pytest.raises(SystemExit):
        main(["reproduce", "--out", str(tmp_path), "--configs", str(REPO / "configs"), "--versions", "v2"])
    assert "results.json is not a reproduce results file" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_header_lines_give_targets_and_device(tmp_path):
    config = tmp_path / "v9.yaml"
    config.write_text("# v9 — a test.\n# target: train 1.0, val 1.5\n# device: gpu\nmodel: {}\n")
    assert read_header(config) == {"target": {"train": 1.0, "val": 1.5}, "device": "gpu"}
    assert read_header(REPO / "configs" / "v4.yaml") == {"target": None, "device": None}


def test_v7_cpu_schedule_steps_once_per_optimizer_step(tmp_path):
    """The YAML's lr_scheduler reaches the optimizer and advances per step, not per epoch."""
    import torch

    from nanogpt_pl.cli import cli

    trainer = cli(args=[
        "fit", "--config", str(REPO / "configs" / "v7_cpu.yaml"), *TINY,
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.data_path", str(REPO / "data" / "tinyshakespeare" / "input.txt"),
    ]).trainer
    reference = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)]), max_lr=1e-3, total_steps=2000,
        pct_start=0.05, div_factor=10.0, final_div_factor=1.0, cycle_momentum=False,
    )
    for _ in range(trainer.global_step):
        reference.optimizer.step()
        reference.step()
    assert trainer.global_step == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0])
    assert trainer.optimizers[0].param_groups[0]["lr"] > 1e-4  # warming up from 1e-4 towards 1e-3


def test_a_stopped_reproduction_says_what_its_rerun_does(tmp_path, capsys, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stopped(args):  # fit, stopped by Ctrl-C after writing its checkpoint
        raise SIGTERMException

    monkeypatch.setattr("nanogpt_pl.reproduce.cli", stopped)
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--out", str(tmp_path), "--configs", str(REPO / "configs"), "--versions", "v2",
              "--seeds", "7"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err == ("reproduce stopped. 0 of 1 runs finished; 1 stopped with a last.ckpt (v2 seed 7: a rerun of "
                   "reproduce trains them again from step 0); 0 not started.\n"), err


def test_parallel_runs_give_the_serial_runs_figures(tmp_path):
    # Two seeds: --jobs 2 trains them in two one-thread processes, the serial run here with one
    # thread too. Every figure but the clock is the same, each seed in its place.
    import torch

    threads = torch.get_num_threads()
    common = ["--versions", "v3", "--seeds", "5,6", "--max_steps", "6", "--eval_iters", "2",
              "--configs", str(REPO / "configs")]
    torch.set_num_threads(1)
    try:
        main(["reproduce", *common, "--out", str(tmp_path / "serial")])
    finally:
        torch.set_num_threads(threads)
    main(["reproduce", *common, "--jobs", "2", "--out", str(tmp_path / "parallel")])

    def figures(out):
        records = json.loads((out / "results.json").read_text())
        for record in records.values():
            record.pop("wall_s")
            for run in record["seeds"]:
                run.pop("wall_s")
        return records

    serial, parallel = figures(tmp_path / "serial"), figures(tmp_path / "parallel")
    assert sorted(parallel) == ["v3"] and [r["seed"] for r in parallel["v3"]["seeds"]] == [5, 6]
    assert parallel == serial


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_ctrl_c_stops_every_parallel_run_records_the_finished_and_leaves_no_process(tmp_path):
    # quick (2 seeds) finishes, long (2 seeds) trains until stopped, later (2 seeds) never starts.
    configs = tmp_path / "configs"
    configs.mkdir()
    v2 = (REPO / "configs" / "v2.yaml").read_text()
    tiny = v2.replace("eval_iters: 200", "eval_iters: 2").replace("batch_size: 32", "batch_size: 4")
    for name, steps, every in (("quick", 4, 2), ("long", 10**7, 5), ("later", 4, 2)):
        (configs / f"{name}.yaml").write_text(
            tiny.replace("max_steps: 5000", f"max_steps: {steps}").replace("val_check_interval: 500", f"val_check_interval: {every}"))
    out = tmp_path / "out"
    parent = subprocess.Popen(
        [sys.executable, "-m", "nanogpt_pl", "reproduce", "--configs", str(configs), "--versions", "quick,long,later",
         "--seeds", "1,2", "--jobs", "2", "--out", str(out)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )
    lasts = [out / "runs" / "long" / f"seed{s}" / "checkpoints" / "last.ckpt" for s in (1, 2)]
    deadline = time.monotonic() + 240
    try:
        while not ((out / "results.json").is_file() and all(p.is_file() for p in lasts)):
            assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        os.killpg(parent.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        stopped_at = time.monotonic()
        err = parent.communicate(timeout=120)[1].decode()
    finally:
        if parent.poll() is None:
            parent.kill()  # its workers get SIGTERM from the kernel as it dies
    assert parent.returncode == 1 and time.monotonic() - stopped_at < 60, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    summary = [line for line in err.splitlines() if line.startswith("reproduce stopped")]
    assert summary == [
        f"reproduce stopped by SIGINT. 2 of 6 runs finished, recorded in {out / 'results.json'}; 2 stopped with a "
        "last.ckpt (long seed 1, long seed 2: a rerun of reproduce trains them again from step 0); 2 not started."
    ], err[-3000:]
    assert sorted(json.loads((out / "results.json").read_text())) == ["quick"]
    assert not (out / "runs" / "later").exists()
    for last in lasts:  # each stopped run saved the step it stopped at
        assert torch.load(last, weights_only=True)["global_step"] > 0
    assert _processes_mentioning(str(out)) == []
