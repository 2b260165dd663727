"""Monitoring, checked from the outside: a real TensorBoard server over a real run's logs, the
terminal output of that run, and --help."""

from __future__ import annotations

import html
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import fields
from inspect import signature
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from conftest import REPO
from nanogpt_pl.cli import main
from nanogpt_pl.data import CharDataModule, CharTokenizer
from nanogpt_pl.model import GPT, GPTConfig
from nanogpt_pl.module import GPTModule
from nanogpt_pl import gpu_peaks
from nanogpt_pl.monitoring import PEAK_TAG, HParamsMetric, TextSample, TokenThroughput, training_flops
from nanogpt_pl.terminal import RunSummary

MAX_STEPS, EVAL_EVERY, LOG_EVERY, SAMPLE_CHARS = 6, 3, 2, 40
RUN = [
    "--config", str(REPO / "configs" / "v2.yaml"),
    "--trainer.max_steps", str(MAX_STEPS),
    "--trainer.val_check_interval", str(EVAL_EVERY),
    "--trainer.log_every_n_steps", str(LOG_EVERY),
    "--trainer.accelerator", "cpu",
    "--data.eval_iters", "2",
    "--sample.max_new_tokens", str(SAMPLE_CHARS),
]
# Any warning of these categories makes the run fail: a normal run must not print one.
QUIET = "error::UserWarning,error::FutureWarning,error::RuntimeWarning"

SUMMARY = re.compile(
    r"^done: (?P<steps>\d+) steps in \S+; estimate train (?P<train>\d+\.\d{4}), val (?P<val>\d+\.\d{4}); "
    r"best checkpoint (?P<best>\S+\.ckpt)$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short v2 run from the command line, progress bar on, as a user would start it."""
    cwd = tmp_path_factory.mktemp("run")
    text = (REPO / "data" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20_000]
    (cwd / "small.txt").write_text(text, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": QUIET}
    proc = subprocess.run(
        [sys.executable, "-m", "nanogpt_pl", "fit", *RUN, "--data.data_path", "small.txt"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


@pytest.fixture(scope="module")
def summary(run):
    _, proc = run
    match = SUMMARY.search(proc.stdout)
    assert match, f"no end-of-run summary in:\n{proc.stdout[-2000:]}"
    return match


class TensorBoard:
    """A real ``tensorboard`` server on a free localhost port, queried over HTTP."""

    def __init__(self, logdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its own process group: it starts a data server of its own
        )

    def get(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def wait_for(self, predicate, timeout: float = 90):
        """Poll until the server is up and ``predicate(self)`` holds (it loads logs in the background)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if predicate(self):
                    return
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError("tensorboard did not serve the run's logs in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def tensorboard(run):
    cwd, _ = run
    server = TensorBoard(cwd / "tb_logs" / "v2")
    try:
        server.wait_for(lambda tb: "val/loss" in tb.get("/data/plugin/scalars/tags")["version_0"])
        yield server
    finally:
        server.stop()


def scalars(tb: TensorBoard, tag: str) -> list[tuple[int, float]]:
    rows = tb.get(f"/data/plugin/scalars/scalars?run=version_0&tag={urllib.request.quote(tag, safe='')}")
    return [(step, value) for _, step, value in rows]


def load_model(checkpoint_path: Path) -> GPT:
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    model = GPT(GPTConfig(**checkpoint["hyper_parameters"]["config"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()
                           if k.startswith("model.")})
    return model.eval()


def test_tensorboard_serves_the_scalars_the_run_printed(tensorboard, run, summary):
    tags = set(tensorboard.get("/data/plugin/scalars/tags")["version_0"])
    assert {
        "train/loss", "train/loss_eval", "val/loss", "train/perplexity_eval", "val/perplexity",
        "lr-AdamW", "throughput/tokens_per_sec", "throughput/flops_per_sec",
    } <= tags
    assert "hp_metric" not in tags
    assert "throughput/mfu" not in tags  # a CPU has no known peak FLOP/s; MFU is for GPUs

    # The estimate after N steps sits at step N, one point per evaluation, the last as printed.
    evals = list(range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY))
    for split, tag in (("train", "train/loss_eval"), ("val", "val/loss")):
        points = scalars(tensorboard, tag)
        assert [step for step, _ in points] == evals
        assert f"{points[-1][1]:.4f}" == summary[split]
        perplexity = scalars(tensorboard, tag.replace("loss", "perplexity"))
        assert [step for step, _ in perplexity] == evals
        for (_, loss), (_, ppl) in zip(points, perplexity):
            assert ppl == pytest.approx(math.exp(loss), rel=1e-4)

    # The per-step loss is written every log_every_n_steps steps, not every step; lr alongside.
    train_steps = [step for step, _ in scalars(tensorboard, "train/loss")]
    assert len(train_steps) == MAX_STEPS // LOG_EVERY
    lr = scalars(tensorboard, "lr-AdamW")
    assert [step for step, _ in lr] == train_steps and all(v == pytest.approx(1e-3) for _, v in lr)

    # FLOPs per token, as logged, are the model's own count for one training step of a batch.
    tokens = dict(scalars(tensorboard, "throughput/tokens_per_sec"))
    flops = dict(scalars(tensorboard, "throughput/flops_per_sec"))
    assert tokens and tokens.keys() == flops.keys() and all(v > 0 for v in tokens.values())
    cwd, _ = run
    model = load_model(cwd / summary["best"])
    batch_size, block_size = 32, model.config.block_size  # v2's
    per_token = training_flops(model.train(), batch_size, block_size) / (batch_size * block_size)
    for step in tokens:
        assert flops[step] / tokens[step] == pytest.approx(per_token, rel=1e-3)


def test_tensorboard_serves_the_samples_the_model_generates(tensorboard, run):
    cwd, _ = run
    assert tensorboard.get("/data/plugin/text/tags") == {"version_0": ["sample/text_summary"]}
    entries = tensorboard.get("/data/plugin/text/text?run=version_0&tag=sample/text_summary")
    assert [e["step"] for e in entries] == list(range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY))
    served = html.unescape(re.search(r"<pre><code>(.*?)\n?</code></pre>", entries[-1]["text"], re.S)[1])

    # The last sample is what the final model generates with the sampler's seed.
    model = load_model(cwd / "tb_logs" / "v2" / "version_0" / "checkpoints" / "last.ckpt")
    tokenizer = CharTokenizer.from_text((cwd / "small.txt").read_text(encoding="utf-8"))
    expected = TextSample(max_new_tokens=SAMPLE_CHARS).generate(model, tokenizer)
    assert served == expected
    assert len(expected) == SAMPLE_CHARS


def test_tensorboard_shows_hyperparameters_with_the_final_val_loss(tensorboard, summary):
    experiment = tensorboard.get("/data/plugin/hparams/experiment", {"experimentName": ""})
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["val/loss"]
    groups = tensorboard.get("/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [],
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
    })["sessionGroups"]
    assert len(groups) == 1
    hparams = groups[0]["hparams"]
    assert hparams["model.config.n_embd"] == 32 and hparams["model.config.head_size"] == 16
    assert hparams["data.batch_size"] == 32 and hparams["optimizer.lr"] == pytest.approx(1e-3)
    assert hparams["trainer.max_steps"] == MAX_STEPS and hparams["model.config.residual"] == "false"
    (metric,) = groups[0]["metricValues"]
    assert metric["trainingStep"] == MAX_STEPS
    assert f"{metric['value']:.4f}" == summary["val"]


def test_terminal_shows_progress_and_one_line_summary(run, summary):
    cwd, proc = run
    assert int(summary["steps"]) == MAX_STEPS
    assert (cwd / summary["best"]).is_file()
    # The bar's last state: all steps done, the loss, the final val estimate, tokens per second.
    assert re.search(rf"train: 100%.*\| {MAX_STEPS}/{MAX_STEPS} \[.*loss=\d\.\d{{4}}, val={summary['val']}, "
                     rf"tok/s=[\d.]+k?\]", proc.stdout)
    assert "v_num" not in proc.stdout  # Lightning's default bar shows the log version instead


def test_normal_run_prints_no_warnings(run):
    _, proc = run  # ran with UserWarning, FutureWarning and RuntimeWarning turned into errors
    output = proc.stdout + proc.stderr
    assert not re.search(r"warn", output, re.IGNORECASE), output[-3000:]
    assert "litlogger" not in output


class RecordingLogger(Logger):
    """Keeps what it is asked to log, for the in-process runs below."""

    name, version = "recording", 0

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def fit_tiny(data_path: Path, root: Path, **trainer_kwargs) -> L.Trainer:
    data = CharDataModule(str(data_path), block_size=8, batch_size=4, eval_iters=2)
    module = GPTModule(GPTConfig(vocab_size=data.vocab_size, block_size=8, n_embd=16, n_head=2, n_layer=1))
    trainer = L.Trainer(**{
        "max_steps": 4, "val_check_interval": 2, "num_sanity_val_steps": 0, "accelerator": "cpu",
        "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "default_root_dir": root, **trainer_kwargs,
    })
    trainer.fit(module, data)
    return trainer


def test_mfu_is_logged_where_the_device_peak_is_known(tmp_path, monkeypatch, small_text):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    peak, note = 1e12, "MFU of a known GPU against its dense bf16 peak"  # a CPU has neither
    monkeypatch.setattr(gpu_peaks, "available_flops", lambda device, dtype: (peak, note))
    logger, board = RecordingLogger(), TensorBoardLogger(tmp_path, name="peak")
    fit_tiny(small_text, tmp_path, logger=[logger, board], callbacks=[TokenThroughput()], log_every_n_steps=2)
    rows = [(step, m) for step, m in logger.metrics if "throughput/mfu" in m]
    assert [step for step, _ in rows] == [2, 4]
    for _, m in rows:
        assert m["throughput/mfu"] == pytest.approx(m["throughput/flops_per_sec"] / peak)
    events = EventAccumulator(board.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    (entry,) = events.Tensors(f"{PEAK_TAG}/text_summary")  # written once, at the start
    assert entry.step == 0 and entry.tensor_proto.string_val[0].decode() == note


def test_monitoring_is_harmless_without_a_logger(tmp_path, small_text, capsys):
    callbacks = [TokenThroughput(), TextSample(), HParamsMetric(), RunSummary()]
    trainer = fit_tiny(small_text, tmp_path, logger=False, callbacks=callbacks)
    assert trainer.global_step == 4
    # No checkpoint to name: the summary says the rest.
    line = r"^done: 4 steps in \S+; estimate train \d+\.\d{4}, val \d+\.\d{4}$"
    assert re.search(line, capsys.readouterr().out, re.M)


def test_checkpoints_between_evaluations_are_named_after_their_own_step(tmp_path, small_text):
    # The evaluations log "step" for TensorBoard's x-axis; it must not linger for later saves.
    from lightning.pytorch.callbacks import ModelCheckpoint

    every_step = ModelCheckpoint(tmp_path / "ckpt", filename="step{step}", every_n_train_steps=1, save_top_k=-1,
                                 auto_insert_metric_name=False)
    fit_tiny(small_text, tmp_path, callbacks=[every_step], enable_checkpointing=True, max_steps=5)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"step{i}.ckpt" for i in range(1, 6)]


def test_no_dataloader_worker_warning_on_many_cores(tmp_path, monkeypatch, small_text):
    """Lightning warns about DataLoaders without workers on machines with more than two cores;
    pretend to be one and check that a run has no such warning to give."""
    monkeypatch.setattr(
        "lightning.pytorch.trainer.connectors.data_connector.suggested_max_num_workers", lambda *_: 15
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", PossibleUserWarning)
        trainer = fit_tiny(small_text, tmp_path)
    assert trainer.global_step == 4


def help_text(capsys, monkeypatch, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", [str(REPO / "nanogpt_pl" / "__main__.py")])  # as python -m nanogpt_pl
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    assert exit.value.code == 0
    return capsys.readouterr().out


def test_help_describes_every_model_and_data_argument(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the default data file is read to link the vocabulary size
    options = {**{f"--model.config.{f.name}": f for f in fields(GPTConfig) if f.name not in ("vocab_size", "block_size")},
               **{f"--data.{name}": name for name in signature(CharDataModule.__init__).parameters if name != "self"}}
    text = help_text(capsys, monkeypatch, "fit", "--help")
    for option in options:
        # The option's own entry (not the usage line): its name, then its description, then "(type: ...".
        entry = re.search(rf"^  {re.escape(option)} [^\n]*\n(?P<text>.*?)\(type:", text, re.S | re.M)
        assert entry, f"{option} missing from fit --help"
        words = entry["text"].split()
        assert len(words) >= 3, f"{option} has no description in fit --help"
    # The linked arguments say where their value comes from.
    assert "data.block_size --> model.config.block_size" in text
    top = help_text(capsys, monkeypatch, "--help")
    assert top.startswith("usage: python -m nanogpt_pl") and "Let's build GPT" in top


def test_training_flops_are_measured_from_the_model():
    config = GPTConfig(vocab_size=65, block_size=8, n_embd=32, n_head=4, n_layer=3)
    model = GPT(config)
    flops = training_flops(model, batch_size=4, block_size=8)
    # Forward and backward of every Linear cost at least 6 FLOPs per weight per token.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops >= 6 * linear * 4 * 8
    assert training_flops(model, batch_size=8, block_size=8) == 2 * flops
    assert training_flops(GPT(GPTConfig(**{**config.__dict__, "n_layer": 6})), 4, 8) > flops
    assert training_flops(GPT(GPTConfig(vocab_size=65, block_size=8, bigram=True)), 4, 8) == 0
