"""Checkpoints you can trust: exact resume, atomic writes, a clean stop on SIGTERM / Ctrl-C, no NaN saved.

Lightning already saves the model, the optimizer, the loop counters and the datamodule's state (the
block sampler's random streams and the vocabulary). What it leaves out, and what this module adds:

- ``GlobalRandomState``: the global torch generator that dropout draws from, per process.
- ``AtomicCheckpointIO``: a checkpoint appears complete under its name, or not at all.
- ``LastCheckpoint``: ``last.ckpt`` follows every estimate, not only the improving ones.
- ``GracefulStop``: SIGTERM and the first Ctrl-C stop every process at the same optimizer step
  (after a running estimate), write ``last.ckpt`` and exit; a second Ctrl-C quits at once.
- ``NonFiniteLossGuard``: a NaN/inf training loss stops the run before anything overwrites the
  last good checkpoint.
- ``find_last_checkpoint``: what ``--ckpt_path last`` means on the command line.
"""

from __future__ import annotations

import errno
import io
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import _get_rank as _launch_rank
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nanogpt_pl import steps
from nanogpt_pl.errors import UsageError
from nanogpt_pl.seeds import stream_seed

LAST = "last"  # ModelCheckpoint's name for the newest checkpoint: last.ckpt (last-v1.ckpt, ... on name clashes)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in its own directory, then renames it into place.

    A rename within one directory is atomic, so a process killed at any moment leaves either the
    previous complete ``last.ckpt`` or the new one. (Lightning's default stages the file in the
    system temp directory, whose move onto another file system is a copy that a kill can cut short.)
    Remote paths keep Lightning's own writer.
    """

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        """Always ``weights_only=True`` and local: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` or a URL must not
        let a planted checkpoint run code (the CLI's checkpoint gate has checked the file already)."""
        if not isinstance(get_filesystem(path), LocalFileSystem):
            raise UsageError(f"checkpoint {path} is not a local file: download it and pass the file.")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One fixed name per target: a file left by a killed writer is simply overwritten next time.
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as RuntimeError
            partial.unlink(missing_ok=True)
            if not _disk_full(err):
                raise
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            raise UsageError(
                f"no space left in {path.parent} to save {path.name} ({buffer.tell():,} bytes needed); "
                "free space there and resume with --ckpt_path last (the previous checkpoint is intact)."
            ) from None
        os.replace(partial, path)
        _fsync_directory(path.parent)


def lock_run_folder(folder: Path) -> Optional[Any]:
    """One resumed run per version folder: an exclusive ``flock`` held until the process ends.

    The kernel drops the lock when its holder dies, so a killed run never blocks the next resume.
    Only the process that writes the folder holds it: global rank 0 as the launcher sees it (no rank
    set yet, or rank 0 of node 0). The processes of the same run that Lightning, torchrun or SLURM
    start beside it parse the same command line and must not find the folder taken by their own run.
    """
    import fcntl

    if (_launch_rank() or 0) != 0 or int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0))) != 0:
        return None
    handle = open(folder / ".run.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UsageError(
            f"{folder} is in use by another run (PID {holder}): wait for it to finish or stop it first."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err) or (
        "inline_container" in str(err)
    )


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    stream seed (``nanogpt_pl.seeds``). A resume continues each saved state; resumed on more
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


class GracefulStop(Callback):
    """SIGTERM or Ctrl-C: every process stops at the same optimizer step, writes ``last.ckpt`` and
    exits; a second Ctrl-C quits at once.

    A signal only raises a flag in the process that receives it, so a signal to any one process is
    enough. The processes compare flags where a stop can take effect: at the end of each logging
    step (of every optimizer step in one process, where comparing costs nothing) and at the end of
    each estimate, before its checkpoints are written. Once agreed, they stop after that step, never
    inside an accumulation window, and after the step's estimate if one is due: Lightning would
    abandon it half-way, a state no uninterrupted run passes through, so resuming is exact. A signal
    that arrives once the last step is done changes nothing: the run finishes and exits 0.
    (Lightning's own Ctrl-C handling stops mid-step and saves nothing.)
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._received: Optional[int] = None
        self._stopping = False  # agreed by every process: stop at the end of this step
        self._finishing = False  # the last step is done: the run ends as planned, signals or not
        self._validated_at = -1
        self._saving = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning 2.6 broadcasts process 0's SIGTERM flag before every training batch of a
        # multi-process run (_TrainingEpochLoop._broadcast_sigterm_tensor): a collective and a host
        # sync per step, met by the processes at different points when a stop is under way (a hang).
        # The processes agree here instead, and only where a stop can take effect.
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received, self._stopping, self._finishing, self._validated_at = None, False, False, -1
        if trainer.received_sigterm:  # caught by Lightning's handler, before ours was in place
            trainer._signal_connector.received_sigterm = False
            self._received = signal.SIGTERM
        if threading.current_thread() is not threading.main_thread():
            return
        # Ours replaces Lightning's SIGTERM handler, which forwards the signal to the other local
        # processes and runs a collective inside the handler.
        for signum in self.SIGNALS:
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
        print(
            f"received {name}: stopping at the end of this step (with several processes: of the next "
            "logging step or estimate) and writing a checkpoint (press Ctrl-C again to quit at once, "
            "without one).",
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
        if steps.reduce(trainer, int(self._received is not None), "max"):
            self._stopping = True
            trainer._signal_connector.received_sigterm = True  # Lightning stops at the end of the step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stopping:  # hold Lightning's stop until the estimate is complete
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        self._validated_at = trainer.global_step
        self._decide(trainer)  # before the estimate's checkpoints: they are written either way
        if self._stopping:
            trainer._signal_connector.received_sigterm = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # After a step with an estimate, Lightning's resume counts one more step for its logger
        # than after other steps (it expects such checkpoints from the estimate's end, before the
        # count advanced). Hold the count there, or the resumed run would log one step to the right.
        if self._saving and self._validated_at == trainer.global_step:
            counters = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
            if "_batches_that_stepped" in counters:
                counters["_batches_that_stepped"] -= 1

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()  # only now: a signal during the end-of-fit hooks changes nothing

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save_stop_checkpoint(trainer)  # our handlers stay in place while it is written
        self._restore_handlers()
        if isinstance(exception, (SIGTERMException, NonFiniteLoss)):
            _outlive_children(trainer)

    def _save_stop_checkpoint(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None:
            _say(f"stopped at step {step}; checkpointing is off, so nothing was saved.")
            return
        if not checkpoint.save_last:
            _say(
                f"stopped at step {step}; checkpoint.save_last is off, so no checkpoint was written for "
                "it. Continue from a saved one with: fit ... --ckpt_path PATH"
            )
            return
        # Lightning's own naming of last.ckpt: this run's file, or last-v1.ckpt (...) where another
        # run's last.ckpt is in the same folder.
        self._saving = True
        try:
            checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
        finally:
            self._saving = False
        _say(f"stopped at step {step}; saved {checkpoint.last_model_path}. Continue with: fit ... --ckpt_path last")


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


def callbacks() -> list[Callback]:
    """The callbacks every training run of the command line gets (fresh instances per run)."""
    return [GlobalRandomState(), GracefulStop(), NonFiniteLossGuard()]


@rank_zero_only
def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_last_checkpoint(directory: Path, subdirectories: str = "") -> Path:
    """The most recently written ``last*.ckpt`` in ``directory`` (or in its ``subdirectories`` pattern).

    On the command line the directory is the logger's ``<save_dir>/<name>`` (``tb_logs/v2``) and the
    pattern ``*/checkpoints/``: every fresh ``fit`` gets a new version folder there, and
    ``--ckpt_path last`` picks the run whose ``last.ckpt`` was written last.
    """
    pattern = f"{subdirectories}{LAST}*.ckpt"
    candidates = list(directory.glob(pattern)) if directory.is_dir() else []
    if not candidates:
        raise UsageError(
            f"--ckpt_path last: no checkpoint matches {directory / pattern}; start a fresh run without "
            "--ckpt_path, or pass the path of a .ckpt file."
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)
