"""``cache``: the token cache's entries, and removing the ones no run will open again.

Each edit of a corpus gives it a new entry (``nanogpt_pl.corpus``: the key follows the files), and
the old one stays: a 1 GB text edited five times holds 5 GB. An entry is *stale* when its sources
are gone or have changed since it was built (their key is no longer the entry's name), so no run
can reach it, and *damaged* when its record cannot be read; ``--prune`` removes those, ``--clear``
every entry. A killed build's temporary folder is listed as *leftover* and removed by either.

Only folders this package marked as its own are listed or removed: a ``--cache_dir`` pointed at a
folder that holds other things (even folders named like entries) loses none of them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

from nanogpt_pl.corpus import _Damaged, build_lock, cache_folders, cache_key, default_cache_dir, read_meta
from nanogpt_pl.errors import UsageError
from nanogpt_pl.run.files import remove_marked


def cache(*, cache_dir: Optional[str] = None, prune: bool = False, clear: bool = False) -> None:
    """List the token cache's entries (size, state, sources); remove stale ones or all of them.

    Args:
        cache_dir: The cache to look at: data.cache_dir of your runs (default ~/.cache/nanogpt_pl).
        prune: Remove the stale and damaged entries (their text files are gone or changed since, or
            their record is unreadable: no run opens them) and the leftovers of killed builds.
        clear: Remove every entry (the next run of each text rebuilds its own) and every leftover.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if os.path.lexists(root) and not root.is_dir():
        raise UsageError(f"--cache_dir {root} is a file, not the cache folder.")
    entries, leftovers = cache_folders(root), cache_folders(root, leftover=True)
    if not entries and not leftovers:
        print(f"token cache {root}: empty")
        return
    total = removed = 0
    for (folder, key), leftover in [*((e, False) for e in entries), *((f, True) for f in leftovers)]:
        size = _size(folder)
        state, sources = ("leftover", []) if leftover else _state(folder)
        if clear or (prune and state != "current"):
            if _remove(root, folder, key, leftover):
                state, removed = "removed", removed + size
            else:
                state = "building"
        total += size
        shown = sources[0] if sources else ("(a killed build's temporary folder)" if leftover else "(unknown sources)")
        more = f" and {len(sources) - 1} more" if len(sources) > 1 else ""
        print(f"{key[:12]}  {size / 2**20:9.1f} MiB  {state:8}  {shown}{more}")
    print(f"token cache {root}: {len(entries)} entries" + (
        f" and {len(leftovers)} leftover build folders" if leftovers else ""
    ) + f", {total / 2**20:.1f} MiB" + (f", {removed / 2**20:.1f} MiB removed" if removed else ""))


def _size(folder: Path) -> int:
    """Bytes of the regular files directly in ``folder`` (links are not followed)."""
    try:
        with os.scandir(folder) as it:
            return sum(e.stat(follow_symlinks=False).st_size for e in it if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def _state(entry: Path) -> tuple[str, list[str]]:
    """``current``, ``stale`` (no run can open it again) or ``damaged``, and the sources it records."""
    try:
        sources = [str(s) for s in read_meta(entry)["sources"]]
    except _Damaged:
        return "damaged", []
    files = [Path(s) for s in sources]
    try:
        if not files or not all(f.is_file() for f in files) or cache_key(files) != entry.name:
            return "stale", sources
    except OSError:
        return "stale", sources
    return "current", sources


def _remove(root: Path, folder: Path, key: str, leftover: bool) -> bool:
    """Remove a marked folder under its key's lock (never under a run that is building it); False if
    a build holds that lock. An entry's lock file goes with it, if it is a plain file."""
    try:
        with build_lock(root, key, wait=not leftover):
            remove_marked(folder, key)
        if not leftover:
            lock = root / f".{key}.lock"
            if os.path.lexists(lock) and stat.S_ISREG(os.lstat(lock).st_mode):
                lock.unlink()
    except BlockingIOError:
        return False
    except OSError as err:
        raise UsageError(f"cannot remove {folder} ({err.strerror or err}).") from None
    return True
