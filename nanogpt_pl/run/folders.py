"""Where runs live on disk: one writer per run folder, checked writable before the first step.

- ``RunFolder``: one run writes a run folder at a time.
- ``launching_process``: the one process of a run that claims its folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.fabric.utilities.rank_zero import _get_rank as _launch_rank

from nanogpt_pl.errors import UsageError
from nanogpt_pl.run.files import open_lock, probe_file_writable, probe_writable


def launching_process() -> bool:
    """Whether this is the process that writes the run's folders: global rank 0 as the launcher sees
    it (no rank set yet, or rank 0 of node 0). The processes of the same run that Lightning, torchrun
    or SLURM start beside it parse the same command line and must neither claim nor lock anything."""
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return (_launch_rank() or 0) == 0 and node == 0


class RunFolder:
    """One writer per run folder: an exclusive ``flock`` on ``<folder>/.run.lock``, held until the
    process ends (or ``release``).

    The kernel drops the lock when its holder dies, so a killed run never blocks the next one. A
    fresh run takes a new folder with ``claim_new_version``, a resumed one its old folder with
    ``lock``: either way a second run that would write there stops with the holder's PID.
    """

    def __init__(self, folder: Path, handle, created: list[Path]) -> None:
        self.folder, self._handle, self._created = folder, handle, created

    @classmethod
    def lock(cls, folder: Path, created: tuple[Path, ...] = ()) -> "RunFolder":
        """Lock ``folder``, created (with its parents) if missing; ``created``: folders the caller made for it."""
        import fcntl

        created = [*_missing(folder), *created]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open_lock(folder / ".run.lock", write=True)
        except OSError as err:
            raise UsageError(
                f"cannot write the run folder {folder} ({err.strerror or err}): make it writable, or "
                "choose another place with --trainer.logger.init_args.save_dir or --checkpoint.dirpath."
            ) from None
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
        folder = cls(folder, handle, created)
        try:
            folder.check_writable()
        except UsageError:
            folder.release()
            raise
        return folder

    def check_writable(self) -> None:
        """Every path the run will write here takes a write now, not after training: the folder, the
        ``config.yaml`` Lightning rewrites in it, and its ``checkpoints/`` if there is one."""
        checkpoints = self.folder / "checkpoints"
        probes = [(self.folder, probe_writable), (self.folder / "config.yaml", probe_file_writable)]
        if os.path.lexists(checkpoints):
            probes.append((checkpoints, probe_writable))
        for path, probe in probes:
            try:
                probe(path)
            except OSError as err:
                raise UsageError(
                    f"cannot write {path} ({err.strerror or err}): make it writable, or choose another place "
                    "with --trainer.logger.init_args.save_dir or --checkpoint.dirpath."
                ) from None

    @classmethod
    def claim_new_version(cls, parent: Path) -> "RunFolder":
        """The next free ``version_<k>`` under ``parent``, created and locked by this run.

        Created with an exclusive ``mkdir``, so two runs started at once never share a number (the
        logger's own choice, made later, would give both the same one).
        """
        made = _missing(parent)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            taken = [p.name.split("_", 1)[1] for p in parent.glob("version_*")]
        except OSError as err:
            raise UsageError(
                f"cannot write the log folder {parent} ({err.strerror or err}): make it writable, or "
                "choose another place with --trainer.logger.init_args.save_dir."
            ) from None
        version = 1 + max((int(k) for k in taken if k.isdigit()), default=-1)
        while True:
            folder = parent / f"version_{version}"
            try:
                folder.mkdir()
            except FileExistsError:
                version += 1
                continue
            except OSError as err:
                raise UsageError(f"cannot create the run folder {folder} ({err.strerror or err}).") from None
            return cls.lock(folder, created=(folder, *made))

    def release(self) -> None:
        """Unlock. Folders made for this run that it never wrote into (it was refused before starting)
        are removed again, so a refused command leaves nothing behind."""
        self._handle.close()
        if not self._created or [p.name for p in self.folder.iterdir()] != [".run.lock"]:
            return
        (self.folder / ".run.lock").unlink(missing_ok=True)
        for folder in sorted(set(self._created), key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()  # deepest first; one that holds anything else stays
            except OSError:
                break


def _missing(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet."""
    return [p for p in (folder, *folder.parents) if not p.exists()]
