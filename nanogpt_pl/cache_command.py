"""``cache``: the token cache's entries, and removing the ones no run will open again.

Each edit of a corpus gives it a new entry (``nanogpt_pl.corpus``: the key follows the files), and
the old one stays: a 1 GB text edited five times holds 5 GB. An entry is *stale* when its sources
are gone or have changed since it was built (their key is no longer the entry's name), so no run
can reach it; ``--prune`` removes those, ``--clear`` every entry.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from nanogpt_pl.corpus import VOCAB, build_lock, cache_key, default_cache_dir
from nanogpt_pl.errors import UsageError

_ENTRY = re.compile(r"[0-9a-f]{32}")  # an entry's name: its key (corpus.cache_key)


def cache(*, cache_dir: Optional[str] = None, prune: bool = False, clear: bool = False) -> None:
    """List the token cache's entries (size, state, sources); remove stale ones or all of them.

    Args:
        cache_dir: The cache to look at: data.cache_dir of your runs (default ~/.cache/nanogpt_pl).
        prune: Remove the stale entries: their text files are gone or changed since (no run opens them).
        clear: Remove every entry (the next run of each text rebuilds its own).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if root.exists() and not root.is_dir():
        raise UsageError(f"--cache_dir {root} is a file, not the cache folder.")
    # Only folders named as entries are: a --cache_dir pointed at the wrong folder loses nothing else.
    entries = sorted(p for p in root.iterdir() if p.is_dir() and _ENTRY.fullmatch(p.name)) if root.is_dir() else []
    if not entries:
        print(f"token cache {root}: empty")
        return
    total = removed = 0
    for entry in entries:
        size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
        sources = _sources(entry)
        state = "stale" if _stale(entry, sources) else "current"
        if clear or (prune and state == "stale"):
            try:
                with build_lock(root, entry.name):  # never under a run that is building it
                    shutil.rmtree(entry)
                (root / f".{entry.name}.lock").unlink(missing_ok=True)
            except OSError as err:
                raise UsageError(f"cannot remove {entry} ({err.strerror or err}).") from None
            state, removed = "removed", removed + size
        total += size
        shown = sources[0] if sources else "(unknown sources)"
        more = f" and {len(sources) - 1} more" if len(sources) > 1 else ""
        print(f"{entry.name[:12]}  {size / 2**20:9.1f} MiB  {state:7}  {shown}{more}")
    print(f"token cache {root}: {len(entries)} entries, {total / 2**20:.1f} MiB" + (
        f", {removed / 2**20:.1f} MiB removed" if removed else ""
    ))


def _sources(entry: Path) -> list[str]:
    try:
        sources = json.loads((entry / VOCAB).read_text(encoding="utf-8")).get("sources")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(s) for s in sources] if isinstance(sources, list) else []


def _stale(entry: Path, sources: list[str]) -> bool:
    """Whether no run can open ``entry`` again: its sources are unknown, gone, or changed since."""
    files = [Path(s) for s in sources]
    if not files or not all(f.is_file() for f in files):
        return True
    return cache_key(files) != entry.name
