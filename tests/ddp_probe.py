"""Callbacks that tests add to a distributed run from the command line
(``--trainer.callbacks+=tests.ddp_probe.Recorder``).

``Recorder`` writes, in each process, what it trained and evaluated on to
``<out_dir>/rank<global rank>.pt`` when ``fit`` ends or stops, so tests can compare the processes
with each other and with the numbers the run logged. The others signal, poison or count.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class Recorder(Callback):
    def __init__(self, out_dir: str) -> None:
        """
        Args:
            out_dir: Folder the per-process records are written to.
        """
        self.out_dir = Path(out_dir)
        self.train_batches: dict[int, torch.Tensor] = {}  # global step -> x
        self.eval_losses: list[dict] = []  # one entry per evaluated batch
        self.estimates: list[dict] = []  # what was logged after each evaluation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train_batches[trainer.global_step] = batch[0].cpu().clone()

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # A request stacks n_batches batches: the loss of each, one forward each, as the lecture's
        # estimate_loss computes them.
        x, y, request = batch
        for xb, yb in zip(x.chunk(request.n_batches), y.chunk(request.n_batches)):
            _, loss = pl_module(xb, yb)
            self.eval_losses.append({"step": trainer.global_step, "split": request.split, "loss": loss.item()})

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        self.estimates.append(
            {"step": trainer.global_step, "train": metrics["train/loss_eval"].item(), "val": metrics["val/loss"].item()}
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, stopped_at=None)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._write(trainer, stopped_at=trainer.global_step)

    def _write(self, trainer, stopped_at) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "world_size": trainer.world_size,
            "train_batches": self.train_batches,
            "eval_losses": self.eval_losses,
            "estimates": self.estimates,
            "stopped_at": stopped_at,
        }
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


class SignalProcess0(Callback):
    """Sends SIGTERM to process 0 alone, at the end of training step ``step`` or while the estimate's
    checkpoints of that step are being written (``during``: "step" or "checkpoint")."""

    def __init__(self, step: int, during: str = "step") -> None:
        """
        Args:
            step: Optimizer step at which to signal.
            during: "step" or "checkpoint".
        """
        self.step, self.during, self.sent = step, during, False

    def _send(self, trainer, moment: str) -> None:
        if trainer.global_rank == 0 and not self.sent and moment == self.during and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, *args) -> None:
        self._send(trainer, "step")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._send(trainer, "checkpoint")


class PoisonWeights(Callback):
    """Makes the loss of process ``rank`` NaN from optimizer step ``step`` on (NaN in its embedding)."""

    def __init__(self, rank: int, step: int) -> None:
        """
        Args:
            rank: Global rank of the process to poison.
            step: Optimizer step whose loss is the first NaN.
        """
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step - 1:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
               "reduce", "gather", "scatter", "reduce_scatter", "all_to_all")


class CountCollectives(Callback):
    """Counts the calls of ``torch.distributed``'s collectives by the optimizer step they happen in,
    apart from those of estimates and their checkpoints; writes ``<out_dir>/collectives<rank>.json``."""

    def __init__(self, out_dir: str) -> None:
        """
        Args:
            out_dir: Folder the counts are written to.
        """
        self.out_dir = Path(out_dir)
        self.counts: dict[int, int] = {}
        self.training = False  # from the start of training on: setting up is not a step

    def on_train_start(self, trainer, pl_module) -> None:
        self.training = True

    def setup(self, trainer, pl_module, stage) -> None:
        def counted(fn):
            def wrapper(*args, **kwargs):
                if self.training and trainer.training and not trainer.validating:
                    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
                    self.counts[step] = self.counts.get(step, 0) + 1
                return fn(*args, **kwargs)
            return wrapper

        for name in COLLECTIVES:
            setattr(torch.distributed, name, counted(getattr(torch.distributed, name)))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"collectives{trainer.global_rank}.json").write_text(json.dumps(self.counts))
