"""Checkpoints you can trust: exact resume.

Lightning already saves the model, the optimizer, the loop counters and the datamodule's state (the
block sampler's random streams and the vocabulary). What it leaves out, and what this module adds:

- ``GlobalRandomState``: the global torch generator that dropout draws from, per process.
- ``LastCheckpoint``: ``last.ckpt`` follows every estimate, not only the improving ones.
- ``ResumedStepCount``: the loggers' step labels continue as an uninterrupted run's.

Writing them is ``nanogpt_pl.run.checkpoint``'s job, stopping a run ``nanogpt_pl.run.stop``'s.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from nanogpt_pl.run.seeds import stream_seed
from nanogpt_pl.run.stop import GracefulStop, NonFiniteLossGuard

class LastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, except that ``last.ckpt`` is rewritten after every estimate.

    Recent Lightning versions write ``last.ckpt`` only when a best-k checkpoint is written too, so
    once the validation loss stops improving it would fall behind the run and resuming from it
    would repeat (and lose) training.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Nothing to do where the parent has just saved (then the step counts as saved).
        if not self.save_last or self._should_save_on_train_epoch_end(trainer):
            return
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class GlobalRandomState(Callback):
    """Carries the global torch random state, which dropout draws from, through checkpoints.

    Restored at the first training step after a resume rather than on load: Lightning draws from
    the same generator when it creates the training dataloader's iterator, which an uninterrupted
    run did long before. Each process has its own state (different dropout masks per rank), so all
    of them are gathered into the checkpoint.

    LightningCLI seeds every process alike, which would give every rank the same dropout masks, and
    the sampler's streams derive from that same seed; so once training starts (after the model was
    built identically everywhere) every process reseeds the generator with its own ``dropout``
    stream seed (``nanogpt_pl.run.seeds``). A resume continues each saved state; resumed on more
    processes than saved, the extra ones keep their fresh dropout seed.
    """

    def __init__(self) -> None:
        self._device: Optional[torch.device] = None
        self._world_size = 1
        self._seed = 0
        self._pending: Optional[list[dict]] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._device, self._world_size = trainer.strategy.root_device, trainer.world_size
        self._seed = torch.initial_seed()  # the run's seed (seed_everything), before any reseeding
        self._pending = None

    def _local_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self._device is not None and self._device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self._device)
        return state

    def state_dict(self) -> dict:
        # Every process builds the checkpoint (only global rank 0 writes it), so gathering is safe here.
        states = [self._local_state()]
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, self._local_state())
        return {"per_rank": states}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict["per_rank"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fresh or resumed alike; a resume then restores the saved state at its first step.
        torch.manual_seed(stream_seed(self._seed, "dropout", trainer.global_rank))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random state of {len(states)} processes, this run has "
                f"{trainer.world_size}: dropout masks will differ from those of an uninterrupted run "
                "(process r continues saved state r where there is one, the others keep a fresh seed)."
            )
        if trainer.global_rank >= len(states):
            return  # keeps the dropout seed on_train_start gave it, its own
        state = states[trainer.global_rank]
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self._device is not None and self._device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self._device)


class ResumedStepCount(Callback):
    """A resumed run labels its steps for the loggers as an uninterrupted run does.

    Lightning labels training step N with its count of ``_batches_that_stepped``, which a checkpoint
    written at an estimate's end holds one short (the count advances after the estimate). Its
    restart adds the missing one only when the resumed run would estimate at that step too, so a
    finished run extended with a larger ``max_steps`` (its last estimate was the final one, not one
    on ``val_check_interval``) logged every later step one step early, and, counting its last step
    one short, skipped its final estimate. With one optimizer the count is simply the optimizer
    steps taken, so the first batch of every run sets it to ``global_step``, whatever the
    checkpoint said (a fresh run: 0 = 0).
    """

    def __init__(self) -> None:
        self._first_batch = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_batch = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # Here rather than at on_train_start: a restart may still advance the count in between.
        if self._first_batch:
            self._first_batch = False
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


def callbacks() -> list[Callback]:
    """The callbacks every training run of the command line gets (fresh instances per run)."""
    return [ResumedStepCount(), GlobalRandomState(), GracefulStop(), NonFiniteLossGuard()]
