"""What a run writes to TensorBoard beyond its losses: throughput, generated text, hyper-parameters.

Each callback writes only on global rank 0 and only to the loggers the trainer has, so a run
without a logger (``--trainer.logger false``) pays nothing for them.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, measure_flops
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.tensorboard.summary import hparams

from nanogpt_pl import gpu_peaks
from nanogpt_pl.run import steps
from nanogpt_pl.run.framework import compute_dtype, event_writer
from nanogpt_pl.errors import UsageError
from nanogpt_pl.generate import sample
from nanogpt_pl.model import GPT
from nanogpt_pl.module import EVAL_TAGS

SAMPLE_TAG = "sample"
PEAK_TAG = "throughput/peak"  # text: the GPU and the peak FLOP/s its MFU is measured against


def training_flops(model: GPT, batch_size: int, block_size: int) -> int:
    """FLOPs of one training step (forward and backward) of ``model`` on a (batch_size, block_size) batch.

    Counted by PyTorch's ``FlopCounterMode`` on a copy built on the meta device: no memory, no
    compute, and no hand formula to fall out of step with the architecture flags. Embedding
    lookups count zero, so the bigram table (v1) has no FLOPs to speak of.
    """
    with torch.device("meta"):
        meta = GPT(model.config)
        idx = torch.zeros(batch_size, block_size, dtype=torch.long)
    meta.train(model.training)
    return measure_flops(meta, lambda: meta(idx, idx)[1], loss_fn=lambda loss: loss)


class TokenThroughput(L.Callback):
    """Tokens per second, model FLOPs per second and, on GPUs with a known peak, MFU.

    Built on Lightning's ``Throughput`` (the engine of its ``ThroughputMonitor``) with FLOPs from
    :func:`training_flops`. ``ThroughputMonitor`` synchronizes CUDA after every step so that its
    clock is exact at each one; this callback reads the clock only on the optimizer steps that log
    (``nanogpt_pl.run.steps.is_logging_step``): counts are cumulative, so the rate between two logged
    steps is the same, and the other steps keep the CPU running ahead of the GPU. Time spent evaluating,
    checkpointing and sampling is left out of the rate.

    Tags: ``throughput/tokens_per_sec`` (all devices), ``throughput/flops_per_sec`` (all devices),
    ``throughput/mfu`` (per device; only on GPUs with a known dense peak: ``nanogpt_pl.gpu_peaks``, whose
    choice is written once as the text ``throughput/peak``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._throughput: Optional[Throughput] = None  # None: nothing to measure (no logger, or not rank 0)
        self._pause_start: Optional[float] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.loggers or not trainer.is_global_zero:
            return
        self._device = trainer.strategy.root_device
        dtype = compute_dtype(trainer)
        available_flops, peak_note = gpu_peaks.available_flops(self._device, dtype)
        log_peak(trainer, peak_note)
        # A window of two updates: the rate over the last logging interval.
        self._throughput = Throughput(
            available_flops=available_flops, world_size=trainer.world_size, window_size=2
        )
        self._steps = self._samples = self._tokens = self._steps_at_update = 0
        self._flops_per_step: Optional[int] = None
        self._paused, self._pause_start = 0.0, None
        self._t0: Optional[float] = None
        self._throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._throughput is None:
            return
        if self._t0 is None:  # the first batch: count its FLOPs, then start the clock
            self._flops_per_step = training_flops(pl_module.model, *batch[0].shape)
            self._t0 = time.perf_counter()
        if self._pause_start is not None:  # back from an evaluation
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._throughput is None:
            return
        x = batch[0]  # (B, T); shapes are known on the host, no sync
        self._steps += 1
        self._samples += x.size(0)
        self._tokens += x.numel()
        if not steps.is_logging_step(trainer):
            return
        step = trainer.global_step
        self._update()
        metrics = self._throughput.compute()
        if "device/items_per_sec" not in metrics:
            return
        world_size = trainer.world_size
        scalars = {"throughput/tokens_per_sec": metrics["device/items_per_sec"] * world_size}
        if self._flops_per_step:
            scalars["throughput/flops_per_sec"] = metrics["device/flops_per_sec"] * world_size
            if "device/mfu" in metrics:
                scalars["throughput/mfu"] = metrics["device/mfu"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._throughput is None or trainer.state.fn != "fit":
            return
        self._update()  # the clock stops when the training work queued so far is done
        self._pause_start = time.perf_counter()

    def _update(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # the one sync: once per logged step and per evaluation
        if self._steps == self._steps_at_update:
            return
        self._throughput.update(
            time=time.perf_counter() - self._t0 - self._paused,
            batches=self._steps,
            samples=self._samples,
            lengths=self._tokens,
            flops=(self._steps - self._steps_at_update) * (self._flops_per_step or 0),
        )
        self._steps_at_update = self._steps


def log_peak(trainer: L.Trainer, note: Optional[str]) -> None:
    """Say once, on the terminal and in TensorBoard, which GPU and peak the run's MFU divides by (or why none)."""
    if note is None:  # off CUDA: no MFU, nothing to say
        return
    rank_zero_info(note)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(PEAK_TAG, note, global_step=trainer.global_step)


class TextSample(L.Callback):
    """A short text generated by the model at every evaluation, logged to TensorBoard as text.

    Always from the same start (token 0, a newline in Tiny Shakespeare, as in the lecture) and the
    same seed, on a generator of its own: successive samples differ only because the model
    learned, and training's random streams are untouched.
    """

    def __init__(self, max_new_tokens: int = 200, seed: int = 1337) -> None:
        """
        Args:
            max_new_tokens: Characters to generate at each evaluation (0: none). 200 is a few lines
                of verse: one small forward pass per character, little next to an evaluation.
            seed: Seed of the sampling generator; a fixed seed makes samples comparable across evaluations.
        """
        super().__init__()
        if max_new_tokens < 0:
            raise UsageError(f"sample.max_new_tokens must be 0 or more, got {max_new_tokens}.")
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    def generate(self, model: GPT, tokenizer) -> str:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(self.seed)
        return sample(model, tokenizer, "", self.max_new_tokens, generator=generator)[0][1:]  # no start token

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not self.max_new_tokens or not loggers or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        text = self.generate(pl_module.model, trainer.datamodule.tokenizer)
        for logger in loggers:
            logger.experiment.add_text(SAMPLE_TAG, as_markdown_code(text), global_step=trainer.global_step)


def as_markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown; an indented block keeps the line breaks and spacing."""
    return "\n".join("    " + line for line in text.split("\n"))


class HParamsMetric(L.Callback):
    """The run's hyper-parameters in TensorBoard's HPARAMS tab, with its final val loss as the metric.

    Written once, at the end of fitting, into the run's own event file. The metric names the
    ``val/loss`` scalar the run already wrote, so the table shows its last value (the final
    estimate) without a placeholder ``hp_metric`` or a second copy of the loss.
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        params = dict(_flatten(run_hparams(trainer, pl_module)))
        summaries = hparams(params, {EVAL_TAGS["val"]: 0.0})  # the value is read from the scalar itself
        for logger in loggers:
            writer = event_writer(logger)
            for summary in summaries:
                writer.add_summary(summary)
            logger.experiment.flush()


def run_hparams(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """What a run was: the model's and data's arguments, the optimizer's settings, the training length."""
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    params: dict[str, Any] = {"model": dict(pl_module.hparams)}
    if trainer.datamodule is not None:
        params["data"] = dict(trainer.datamodule.hparams)
    if optimizer is not None:
        params["optimizer"] = {
            "name": type(optimizer).__name__,
            **{k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        }
    params["trainer"] = {"max_steps": trainer.max_steps, "precision": str(trainer.precision)}
    if "PL_GLOBAL_SEED" in os.environ:  # set by seed_everything
        params["seed"] = int(os.environ["PL_GLOBAL_SEED"])
    return params


def _flatten(params: dict[str, Any], prefix: str = ""):
    """Dotted names, as on the command line (``model.config.n_embd``); values TensorBoard can show."""
    for key, value in params.items():
        if key.startswith("_"):  # bookkeeping such as the CLI's "_instantiator"
            continue
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, bool):  # TensorBoard would show 0.0 and 1.0; the YAML says true/false
            yield f"{prefix}{key}", "true" if value else "false"
        elif value is None:
            yield f"{prefix}{key}", "null"
        else:
            yield f"{prefix}{key}", value if isinstance(value, (int, float, str)) else str(value)
