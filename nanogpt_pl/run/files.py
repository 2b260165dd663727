"""Writing in folders that others share: never through a planted link, never half a file, never
deleting what this package did not write.

Runs write into folders they do not own alone: a token cache shared between users, a checkpoint
folder several runs point at, a results folder. Wherever this package writes or deletes there, it
goes through these functions:

- ``open_lock``: a lock file is opened without following a symbolic link and must be a regular
  file with one name, so a link planted at a lock's name never makes a run truncate or write
  another file (the lock's holder writes its PID into it).
- ``write_atomic``: a file is written under a temporary name beside it, created exclusively (a
  link planted at that name is removed, never written through), then renamed over the target:
  readers see the old file or the new one, and a link at the target is replaced, not followed.
- ``mark`` / ``marked`` / ``remove_marked``: a folder this package creates for itself holds a
  marker file naming what it is; only a folder that holds its marker, and is no link, is ever
  removed (``shutil.rmtree`` itself never follows the links inside).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from nanogpt_pl.errors import UsageError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
MARKER = ".nanogpt_pl"  # the marker file's name inside a folder this package made


def open_lock(path: Path, write: bool = False):
    """``path`` opened for ``flock`` (read-only unless ``write``: a lock shared between users need not
    be theirs to write), created if missing; a link or anything but a plain file is one line."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CREAT | _NOFOLLOW | _CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise UsageError(f"{path} is a symbolic link, not a lock file: remove the link and run again.") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise UsageError(f"{path} is {what}, not a lock file: remove it and run again.")
    return os.fdopen(fd, "r+" if write else "r")


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into ``.<name>.partial`` beside ``path``, flushed to disk, then renamed to ``path``.

    One fixed temporary name per target: a file left by a killed writer is replaced next time. The
    new file gets the mode a plain ``open`` would give it (``0o666 & ~umask``).
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        os.unlink(partial)  # a leftover, or a planted link: the name goes, whatever it pointed to stays
    except FileNotFoundError:
        pass
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        os.replace(partial, path)
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    fsync_directory(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mark(folder: Path, kind: str) -> None:
    """Record in ``folder`` that this package made it, as ``kind`` (e.g. a token cache entry's key)."""
    (Path(folder) / MARKER).write_text(kind + "\n", encoding="utf-8")


def marked(folder: Path, kind: str) -> bool:
    """Whether ``folder`` is a real folder (no link) holding this package's marker for ``kind``."""
    folder = Path(folder)
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        marker = folder / MARKER
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return False
        return marker.read_text(encoding="utf-8").strip() == kind
    except (OSError, UnicodeDecodeError):
        return False


def remove_marked(folder: Path, kind: str) -> bool:
    """Remove ``folder`` if ``marked(folder, kind)``; whether it was removed. Links inside are removed,
    never followed."""
    if not marked(folder, kind):
        return False
    shutil.rmtree(folder)
    return True


def probe_writable(folder: Path) -> None:
    """Raise the ``OSError`` that writing a file in ``folder`` would raise, by creating one under a
    fresh name (never a link's) that is gone again when closed."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def probe_file_writable(path: Path) -> None:
    """Raise the ``OSError`` that overwriting ``path`` would raise (a link there too: the write would
    go through it); a missing file is probed by its folder."""
    path = Path(path)
    if not os.path.lexists(path):
        probe_writable(path.parent)
        return
    if os.path.islink(path):
        raise OSError(errno.ELOOP, "a symbolic link, which the write would follow", str(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | _CLOEXEC)  # opens as a write would; changes nothing
    os.close(fd)
