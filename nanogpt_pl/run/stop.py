"""Stopping a run cleanly: SIGTERM / Ctrl-C, the collective stop decision, no NaN saved.

- ``GracefulStop``: SIGTERM, SIGHUP and the first Ctrl-C stop every process at the same optimizer
  step (after a running estimate), write ``last.ckpt`` and exit; a second Ctrl-C quits at once.
  SLURM's requeue signal does the same and then requeues the job.
- ``NonFiniteLossGuard``: a NaN/inf training loss stops the run before anything overwrites the
  last good checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nanogpt_pl.run import steps
from nanogpt_pl.errors import UsageError

class GracefulStop(Callback):
    """SIGTERM, SIGHUP or Ctrl-C: every process stops at the same optimizer step, writes ``last.ckpt``
    and exits; a second Ctrl-C quits at once. Under SLURM, its requeue signal (SIGUSR1, which
    ``#SBATCH --signal=USR1@90`` sends before the time limit) does the same, then requeues the job.

    A signal only raises a flag in the process that receives it, so a signal to any one process is
    enough. The processes compare flags where a stop can take effect: at the end of each logging
    step (of every optimizer step in one process, where comparing costs nothing) and at the end of
    each estimate, before its checkpoints are written. Once agreed, they stop after that step, never
    inside an accumulation window, and after the step's estimate if one is due: Lightning would
    abandon it half-way, a state no uninterrupted run passes through, so resuming is exact. A signal
    that arrives once the last step is done changes nothing: the run finishes and exits 0.
    (Lightning's own Ctrl-C handling stops mid-step and saves nothing; its SLURM handler writes a
    second, ``hpc_ckpt_<k>.ckpt`` checkpoint that ``--ckpt_path auto`` would never look at.)
    """

    # A closed terminal or a dropped ssh session (SIGHUP) must not lose the run either.
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    # What the processes agree on, the largest wish winning: go on, stop, stop and requeue.
    GO_ON, STOP, REQUEUE = 0, 1, 2

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._received: Optional[int] = None
        self._requeue_signal: Optional[int] = None
        self._auto_requeue = False
        self._stopping = False  # agreed by every process: stop at the end of this step
        self._requeue = False  # agreed as well: requeue the SLURM job once the checkpoint is written
        self._finishing = False  # the last step is done: the run ends as planned, signals or not

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        slurm = isinstance(environment, SLURMEnvironment)
        # SLURM's warning signal stops the run whether or not it requeues: left at its default
        # action (auto_requeue off), it would kill the process without a checkpoint.
        self._requeue_signal = environment.requeue_signal if slurm else None
        self._auto_requeue = slurm and environment.auto_requeue
        # Lightning 2.6 broadcasts process 0's SIGTERM flag before every training batch of a
        # multi-process run (_TrainingEpochLoop._broadcast_sigterm_tensor): a collective and a host
        # sync per step, met by the processes at different points when a stop is under way (a hang).
        # The processes agree here instead, and only where a stop can take effect.
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received, self._stopping, self._requeue, self._finishing = None, False, False, False
        if trainer.received_sigterm:  # caught by Lightning's handler, before ours was in place
            trainer._signal_connector.received_sigterm = False
            self._received = signal.SIGTERM
        if threading.current_thread() is not threading.main_thread():
            return
        # Ours replaces Lightning's SIGTERM handler, which forwards the signal to the other local
        # processes and runs a collective inside the handler, and its SLURM requeue handler.
        for signum in (*self.SIGNALS, *([self._requeue_signal] if self._requeue_signal else [])):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self._received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: quit now, without a checkpoint
            return
        self._received = signum
        name = signal.Signals(signum).name
        if self._finishing:
            print(f"received {name} after the last step: finishing the run.", file=sys.stderr, flush=True)
            return
        then = ""
        if signum == self._requeue_signal:
            then = ", then requeueing the SLURM job" if self._auto_requeue else " (requeueing is off: auto_requeue false)"
        print(
            f"received {name}: stopping at the end of this step (with several processes: of the next "
            f"logging step or estimate) and writing a checkpoint{then} (press Ctrl-C again to quit at "
            "once, without one).",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if steps.is_logging_step(trainer) or (trainer.world_size == 1 and steps.ends_optimizer_step(trainer)):
            self._decide(trainer)

    def _decide(self, trainer: L.Trainer) -> None:
        """Every process calls this at the same points, so the exchange below lines up."""
        if self._stopping or self._finishing:
            return
        if 0 < trainer.max_steps <= trainer.global_step:
            self._finishing = True  # the final estimate and its checkpoints follow, then the end
            return
        wish = self.GO_ON if self._received is None else self.STOP
        if self._received is not None and self._received == self._requeue_signal and self._auto_requeue:
            wish = self.REQUEUE
        agreed = steps.reduce(trainer, wish, "max")
        if agreed != self.GO_ON:
            self._stopping, self._requeue = True, agreed == self.REQUEUE
            trainer._signal_connector.received_sigterm = True  # Lightning stops at the end of the step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stopping:  # hold Lightning's stop until the estimate is complete
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        self._decide(trainer)  # before the estimate's checkpoints: they are written either way
        if self._stopping:
            trainer._signal_connector.received_sigterm = True

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()  # only now: a signal during the end-of-fit hooks changes nothing

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            saved = self._save_stop_checkpoint(trainer)  # our handlers stay in place while it is written
            if self._requeue and trainer.is_global_zero:
                _requeue_slurm_job(saved)
        self._restore_handlers()
        if isinstance(exception, (SIGTERMException, NonFiniteLoss)):
            _outlive_children(trainer)

    def _save_stop_checkpoint(self, trainer: L.Trainer) -> bool:
        """Whether a checkpoint of the stop's step was written."""
        step = trainer.global_step
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None:
            _say(f"stopped at step {step}; checkpointing is off, so nothing was saved.")
            return False
        if not checkpoint.save_last:
            _say(
                f"stopped at step {step}; checkpoint.save_last is off, so no checkpoint was written for "
                "it. Continue from a saved one with: fit ... --ckpt_path PATH"
            )
            return False
        # Lightning's own naming of last.ckpt: this run's file, or last-v1.ckpt (...) where another
        # run's last.ckpt is in the same folder.
        checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
        _say(f"stopped at step {step}; saved {checkpoint.last_model_path}. Continue with: fit ... --ckpt_path last")
        return True


def _requeue_slurm_job(saved: bool) -> None:
    """``scontrol requeue`` this job (array task), as Lightning's own SLURM handler does, once the
    stop's checkpoint is on disk; the requeued script's ``--ckpt_path auto`` continues from it."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    # An array task is <array job>_<task>; with either variable missing, the job's own id names it.
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if not job:
        _say("could not requeue: SLURM_JOB_ID is not set; resubmit the job (it continues with --ckpt_path auto).")
        return
    if not saved:
        _say(f"not requeueing SLURM job {job}: no checkpoint was written, so it would start over.")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as err:
        _say(f"could not requeue SLURM job {job} ({err.strerror or err}); resubmit it (it continues with --ckpt_path auto).")
        return
    if result.returncode:
        reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
        _say(f"could not requeue SLURM job {job} ({reason[0]}); resubmit it (it continues with --ckpt_path auto).")
        return
    _say(f"requeued SLURM job {job}: it continues from that checkpoint with --ckpt_path auto.")


def _outlive_children(trainer: L.Trainer) -> None:
    """Process 0 of a run whose processes it launched waits for them to stop as agreed.

    Lightning's observer in process 0 kills every process, process 0 included, once a child exits
    with a non-zero code, as a stopped or failed one does, possibly before process 0 has said why.
    The observer watches the launcher's list of children: emptied, it has nothing left to watch.
    """
    children = getattr(trainer.strategy.launcher, "procs", None)
    if not trainer.is_global_zero or not children:
        return
    waiting = list(children)
    children.clear()
    for child in waiting:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()


class NonFiniteLoss(UsageError):
    """The training loss is NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Stops training at a NaN or infinite loss, naming the step, before a checkpoint could hold it.

    Every batch's loss is checked on its device; the verdict is read back (a host sync on a GPU)
    only where a stop can take effect: at logging steps, before an estimate and before any
    checkpoint is written, so ``last.ckpt`` keeps the last good state. Under DDP the verdict is
    reduced over the processes at those same points and they all stop together (one stopping alone
    would leave the others waiting in the next all-reduce). On a CPU in one process reading costs
    nothing, so every batch's loss is read as one float instead.
    """

    NONE = 2**62  # no bad step yet (the verdict is the first bad step: a minimum over processes)

    def __init__(self) -> None:
        self._first_bad_step: Optional[torch.Tensor] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_bad_step = torch.tensor(self.NONE, device=pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or self._first_bad_step is None:
            return
        # "step N" is the N-th optimizer step, the one this batch belongs to.
        if trainer.world_size == 1 and loss.device.type == "cpu":
            # Reading the loss costs nothing here: one float per batch, no tensor bookkeeping.
            if not math.isfinite(loss.item()):
                self._stop(trainer, steps.optimizer_step(trainer))
            return
        bad = ~torch.isfinite(loss.detach())
        first_if_bad = self._first_bad_step.clamp(max=steps.optimizer_step(trainer))
        self._first_bad_step = torch.where(bad, first_if_bad, self._first_bad_step)
        if steps.is_logging_step(trainer):
            self._check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._check(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_bad_step = None

    def _check(self, trainer: L.Trainer) -> None:
        if self._first_bad_step is None:
            return
        step = steps.reduce(trainer, int(self._first_bad_step.item()), "min")
        if step != self.NONE:
            self._stop(trainer, step)

    def _stop(self, trainer: L.Trainer, step: int) -> None:
        self._first_bad_step = None  # report once
        last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        raise NonFiniteLoss(
            f"the training loss is not finite (NaN or inf) at step {step}; training stopped and {kept}. "
            "Lower the learning rate (model.optimizer.init_args.lr) or check the data."
        )


@rank_zero_only
def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
