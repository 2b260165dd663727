"""A callback that records, in each process, what it trained and evaluated on.

Added to a run from the command line (``--trainer.callbacks+=tests.ddp_probe.Recorder``), it writes
``<out_dir>/rank<global rank>.pt`` at the end of ``fit``, so tests can compare the processes of a
distributed run with each other and with the numbers the run logged.
"""

from __future__ import annotations

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
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "world_size": trainer.world_size,
            "train_batches": self.train_batches,
            "eval_losses": self.eval_losses,
            "estimates": self.estimates,
        }
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")
