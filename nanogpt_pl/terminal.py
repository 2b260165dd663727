"""What a run prints: one progress bar, one line at the end, and no noise we understand to be harmless."""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from tqdm import tqdm

from nanogpt_pl.run import steps
from nanogpt_pl.module import EVAL_TAGS


class TrainingBar(TQDMProgressBar):
    """step / max_steps, the current loss, the last val estimate and tokens per second.

    Lightning's bar reads the logged metrics after every step. Reading a loss that lives on a GPU
    waits for the GPU to finish (a host sync), which for a small model costs more than the step
    itself. This bar redraws at most every ``refresh_seconds`` and reads the loss only then.
    """

    def __init__(self, refresh_seconds: float = 0.5) -> None:
        super().__init__()
        self.refresh_seconds = refresh_seconds
        self._loss = None  # the latest optimizer step's loss (GPTModule.step_loss), still on its device
        self._loss_value: Optional[float] = None
        self._val: Optional[float] = None
        self._tokens_per_sec: Optional[float] = None
        self._tokens = 0
        self._since = self._last_draw = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.set_description("train", refresh=False)
        bar.unit = "step"
        bar.total = trainer.max_steps if trainer.max_steps > 0 else None
        bar.initial = bar.n = trainer.global_step  # a resumed run continues where it stopped
        self._restart_clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch[0].numel()
        if not steps.ends_optimizer_step(trainer):
            return  # redrawn between optimizer steps only
        # The step's own loss: Lightning's outputs hold it divided by accumulate_grad_batches.
        self._loss = pl_module.step_loss
        if time.perf_counter() - self._last_draw >= self.refresh_seconds or steps.is_last_step(trainer):
            self._draw(trainer)

    @property
    def validation_description(self) -> str:
        return "estimating loss"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        # Lightning's version names the dataloader ("... DataLoader 0"); there is only one.
        if self.has_dataloader_changed(dataloader_idx):
            self.val_progress_bar.reset(total=convert_inf(self.total_val_batches_current_dataloader))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val = trainer.callback_metrics.get(EVAL_TAGS["val"])
        if val is not None:
            self._val = float(val)
        super().on_validation_end(trainer, pl_module)
        self._restart_clock()  # tokens/s counts training time only

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        metrics = {}
        if self._loss_value is not None:
            metrics["loss"] = f"{self._loss_value:.4f}"
        if self._val is not None:
            metrics["val"] = f"{self._val:.4f}"
        if self._tokens_per_sec is not None:
            metrics["tok/s"] = tqdm.format_sizeof(self._tokens_per_sec)
        return metrics

    def _draw(self, trainer: L.Trainer) -> None:
        if self._loss is not None:
            self._loss_value = self._loss.item()  # the host sync, once per redraw
        now = time.perf_counter()
        if self._tokens and now > self._since:
            self._tokens_per_sec = self._tokens * trainer.world_size / (now - self._since)
        self._tokens, self._since, self._last_draw = 0, now, now
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, trainer.lightning_module), refresh=False)
        bar.refresh()

    def _restart_clock(self) -> None:
        self._tokens, self._since = 0, time.perf_counter()


class RunSummary(L.Callback):
    """One line when fitting ends: the final estimates, the wall time and the best checkpoint."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = trainer.global_step  # after a checkpoint's restore: where this run began

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        first_step = getattr(self, "_first_step", 0)
        print(summary_line(trainer, time.perf_counter() - self._start, first_step), flush=True)


def summary_line(trainer: L.Trainer, seconds: float, first_step: int = 0) -> str:
    metrics = trainer.callback_metrics
    steps = f"steps {first_step}-{trainer.global_step}" if first_step else f"{trainer.global_step} steps"
    parts = [f"done: {steps} in {_duration(seconds)}"]
    estimates = [f"{split} {float(metrics[tag]):.4f}" for split, tag in EVAL_TAGS.items() if tag in metrics]
    if estimates:
        parts.append("estimate " + ", ".join(estimates))
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "best_model_path", ""):
        parts.append(f"best checkpoint {_shown_path(checkpoint.best_model_path)}")
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02.0f}s"
    if minutes:
        return f"{minutes}m{seconds:04.1f}s"
    return f"{seconds:.1f}s"


def _shown_path(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_known_noise() -> None:
    """Silence the messages of a normal run that are understood and harmless (and only those).

    - Lightning (2.6) builds ``torch.utils._pytree.LeafSpec`` objects, which current PyTorch flags
      with a FutureWarning on every fit; the code is Lightning's and works as intended.
    - Lightning prints an advertisement for its cloud logger ("litlogger") on every run.
    - Lightning's model summary warns that it cannot size a ``bf16-mixed`` model and counts 32 bits
      per parameter, which is exactly right: under mixed precision the parameters stay float32.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings(
        "ignore", message=r"Precision bf16-mixed is not supported by the model summary", category=UserWarning
    )
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLitLoggerTip) for f in log.filters):
            log.addFilter(_DropLitLoggerTip())
