"""Where a training batch stands among optimizer steps: the one answer every per-step mechanism uses.

With ``accumulate_grad_batches`` N, an optimizer step is N batches, and Lightning's own counters
disagree on what "a step" is (``val_check_interval`` and the batch hooks count batches,
``global_step`` and ``log_every_n_steps`` count optimizer steps). The estimates, the loss logged
and shown, throughput, the NaN guard, stops and checkpoints all act once per optimizer step, at
its last batch, through these functions.

Valid from ``on_train_batch_start`` to ``on_train_batch_end`` of a training batch.
"""

from __future__ import annotations

import lightning as L
import torch


def ends_optimizer_step(trainer: L.Trainer) -> bool:
    """Whether the optimizer steps after this batch (it is the last of its accumulation window)."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def optimizer_step(trainer: L.Trainer) -> int:
    """The number of the optimizer step this batch belongs to, from 1: ``global_step`` once taken.

    The same count as the loggers' (Lightning's ``should_update_logs`` asks the same question), so
    a logging step here is one the loggers write.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped + 1


def is_last_step(trainer: L.Trainer) -> bool:
    """Whether this batch ends the run's last optimizer step (``max_steps``)."""
    return ends_optimizer_step(trainer) and 0 < trainer.max_steps <= optimizer_step(trainer)


def is_logging_step(trainer: L.Trainer) -> bool:
    """Whether this batch ends an optimizer step the loggers write: every ``log_every_n_steps``-th
    and the last; none with ``log_every_n_steps`` 0 (Lightning then logs nothing per step)."""
    every = trainer.log_every_n_steps
    if not every or not ends_optimizer_step(trainer):
        return False
    return optimizer_step(trainer) % every == 0 or is_last_step(trainer)


def count_estimates_in_optimizer_steps(trainer: L.Trainer) -> None:
    """Make an integer ``val_check_interval`` count optimizer steps, as the lecture's eval_interval
    does, rather than batches: every N batches under accumulation, always at a step's end.

    Call once training has started (``on_train_start``): Lightning derives ``val_check_batch`` from
    the interval when it sets up the training data.
    """
    if isinstance(trainer.val_check_interval, int) and trainer.val_check_batch != float("inf"):
        trainer.val_check_batch = trainer.val_check_interval * trainer.accumulate_grad_batches


def reduce(trainer: L.Trainer, value: int, op: str) -> int:
    """``value`` reduced over the processes by ``op`` ("max", "min"): one small all-reduce under DDP
    (a host sync, so only at logging steps, estimates and checkpoints), nothing in one process."""
    if trainer.world_size == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.int64, device=trainer.strategy.root_device)
    torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return int(tensor.item())
