"""A corpus on disk: its text files read once into a cached token file and vocabulary.

Knows nothing of Lightning or of training: files in, a memory-mappable array of token ids out.

- The corpus is one UTF-8 file, or a folder's ``*.txt`` files sorted by path and concatenated. A
  leading byte-order mark of a file is dropped (it is an encoding marker, not a character of the text).
- The vocabulary is the sorted set of the text's characters and a token id is a character's index
  in it (as ``CharTokenizer`` has always done), stored in the smallest unsigned type that holds the
  vocabulary: uint8 for up to 256 characters, then uint16, then uint32. Tiny Shakespeare's 1.1 MB
  become 1.1 MB of uint8 that every process maps; the OS page cache keeps one copy.
- The text is read once, in chunks, so memory stays bounded: each chunk's characters get ids in
  the order they first appear, written straight to the token file, and one pass over that file at
  the end renumbers them into sorted order.
- Cache: ``<cache_dir>/<key>/`` with ``tokens.bin`` (raw ids) and ``vocab.json`` (the vocabulary,
  the id type, the token count, the sources). The key hashes, for every file, its resolved path,
  size, modification time and status-change time (ns), inode and device: an edited, added, removed
  or replaced file gives a new key and is never served stale. The ctime is what catches an edit
  that keeps the size and puts the old mtime back (``touch -d``, ``os.utime``, some sync tools):
  writing a file, or setting its times, sets its ctime to now, and no user can set it back. The
  inode and device catch a file swapped for another copy. The key does not hash the content (that
  would read every byte on every run): an edit made while the system clock is set back, or on a
  filesystem that fakes ctime (some network or FUSE mounts), can still go unseen. The split is not
  stored (it is a slice of the tokens), so ``train_fraction`` is not part of the key.
- An entry is built in a temporary folder and renamed into place: it is complete or absent,
  whatever fails (a non-UTF-8 byte, a full disk, a kill). A kill leaves the temporary folder
  behind; the next builder of that key removes it (builders hold the key's lock, so no live
  builder owns it). The entry gets the mode ``0o777 & ~umask`` (not ``mkdtemp``'s 0700), so a
  cache dir shared between users serves all of them.
- Every open checks the entry, so a damaged one (a disk error, a copy cut short, a hand edit) is
  rebuilt with one note on stderr instead of a traceback deep in training: ``vocab.json`` parses
  and has every field with its type, ``tokens.bin`` holds exactly ``n_tokens`` ids, and every id
  is below the vocabulary's size. That last check reads the ids once (``tokens.max()``): about
  7 ms per 100 MB in the page cache (0.07 s per GB), so it runs on every open rather than being
  cached; on a cold cache it costs one sequential read of the file, which training would fault
  in anyway. The entry is also checked against its text, as the build recorded it: each file's
  size in bytes and its number of characters (which UTF-8 bounds by the size), and its first
  and last 4 KiB decoded afresh and compared with the ids there through the vocabulary. So an
  entry that is consistent in itself but not the text's (a count of 0, an empty vocabulary,
  the vocabulary's characters swapped for others) is rebuilt too. What the windows do not cover
  can still go unseen: ids that are wrong but in range in the middle of a file (a flipped bit
  that names another character), or an edit of characters that occur only there; only a
  checksum, read in full on every run, would catch those.
- Only what this package wrote is ever deleted: every entry and every temporary build folder
  holds a marker (``nanogpt_pl.run.files``) naming its key, and ``cache --prune``/``--clear`` and the
  clean-up of killed builds remove a folder only when its marker names it. Lock files are opened
  without following links.
- Default cache dir: ``$XDG_CACHE_HOME/nanogpt_pl`` (``~/.cache/nanogpt_pl``), never beside the
  text, which may live inside an installed package.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from nanogpt_pl.errors import UsageError
from nanogpt_pl.run.files import mark, marked, open_lock, remove_marked

try:  # serializes builds of one entry across processes; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent builds stay correct, only wasteful
    fcntl = None

FORMAT = 2  # bump when the entry's layout changes: old entries are then simply not found
CHUNK_BYTES = 1 << 24  # 16 MiB of text per step of the pass: bounded memory, few Python iterations
BOM = codecs.BOM_UTF8
ID_TYPES = (np.uint8, np.uint16, np.uint32)
TOKENS, VOCAB = "tokens.bin", "vocab.json"
WINDOW = 4096  # bytes at each end of each file compared with the entry's ids on every open
_KEY = re.compile(r"[0-9a-f]{32}")  # an entry's name: its key (cache_key)
_LEFTOVER = re.compile(r"\.([0-9a-f]{32})\.[^.]+")  # a build's temporary folder: ".<key>.<random>"


@dataclass(frozen=True)
class Corpus:
    """The cached corpus: its vocabulary and its token ids, memory-mapped read-only."""

    chars: str
    tokens: np.ndarray  # (n_tokens,) of the smallest unsigned type holding the vocabulary
    path: Path  # the data_path it was built from, for messages


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanogpt_pl"


def corpus_files(data_path: str | os.PathLike) -> list[Path]:
    """The files a data path stands for: itself, or a folder's ``*.txt`` sorted by path."""
    path = Path(data_path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise UsageError(
                f"data folder {path} holds no .txt files; put the texts to train on there as .txt files "
                "or set data.data_path to a UTF-8 text file."
            )
        return files
    if not path.is_file():
        raise UsageError(f"data file not found: {path} (set data.data_path to a UTF-8 text file or a folder of .txt files).")
    return [path]


def cache_key(files: list[Path]) -> str:
    """Changes whenever any file's content may have changed: see the module docstring for what it covers."""
    sources = []
    for p in files:
        s = p.stat()
        sources.append((str(p.resolve()), s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, s.st_dev))
    return hashlib.sha256(json.dumps([FORMAT, sources]).encode()).hexdigest()[:32]


def load_corpus(data_path: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None) -> Corpus:
    """The corpus of ``data_path``, from the cache; built there first if it is missing or damaged."""
    path = Path(data_path)
    files = corpus_files(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / cache_key(files)
    try:
        opened = _open(entry, files)
    except _Damaged:
        opened = None  # repaired below, under the lock, once no other process is at it
    if opened is None:
        with _writable(root), build_lock(root, entry.name):
            remove_leftovers(root, held=entry.name)
            try:
                opened = _open(entry, files)  # another process may have built it while we waited
            except _Damaged as why:
                print(f"note: the token cache entry {entry} is damaged ({why}); rebuilding it.", file=sys.stderr)
                if not remove_marked(entry, entry.name):
                    raise UsageError(
                        f"{entry} is in the way of the token cache and was not written by nanogpt_pl: move it "
                        "away, or set data.cache_dir to a folder of its own."
                    ) from None
            if opened is None:
                _build(path, files, entry)
                opened = _open(entry, files)
    meta, tokens = opened
    if meta["n_tokens"] == 0:
        what = "data folder" if path.is_dir() else "data file"
        raise UsageError(f"{what} {path} is empty; point data.data_path to a text to train on.")
    return Corpus(meta["vocab"], tokens, path)


class _Damaged(Exception):
    """An entry that exists but cannot be trusted; its message says why, for the note."""


def read_meta(entry: Path) -> dict:
    """An entry's ``vocab.json``, checked for every field and its type; ``_Damaged`` otherwise."""
    try:
        meta = json.loads((entry / VOCAB).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Damaged(f"{VOCAB} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _Damaged(f"{VOCAB} is unreadable: {type(err).__name__}") from None
    fields = {"vocab": str, "dtype": str, "n_tokens": int, "sources": list, "files": list}
    if not isinstance(meta, dict) or any(type(meta.get(k)) is not t for k, t in fields.items()):
        raise _Damaged(f"{VOCAB} lacks one of {', '.join(fields)} or has the wrong type")
    vocab, dtype, n_tokens = meta["vocab"], meta["dtype"], meta["n_tokens"]
    if dtype not in [np.dtype(t).name for t in ID_TYPES] or n_tokens < 0 or list(vocab) != sorted(set(vocab)):
        raise _Damaged(f"{VOCAB} has an unknown id type, a negative count or an unsorted vocabulary")
    counts = meta["files"]
    if not all(isinstance(c, dict) and all(type(c.get(k)) is int for k in ("bytes", "tokens")) for c in counts) or (
        sum(c["tokens"] for c in counts) != n_tokens or len(counts) != len(meta["sources"])
    ):
        raise _Damaged(f"{VOCAB}'s per-file counts do not add up to its {n_tokens} tokens")
    return meta


def _open(entry: Path, files: list[Path]) -> Optional[tuple[dict, np.ndarray]]:
    """The entry's metadata and memory-mapped ids; None if there is no entry; ``_Damaged`` if it is wrong."""
    if not os.path.lexists(entry):
        return None
    if not marked(entry, entry.name):
        raise _Damaged("it holds no nanogpt_pl marker")
    meta = read_meta(entry)
    vocab, dtype, n_tokens = meta["vocab"], meta["dtype"], meta["n_tokens"]
    expected = n_tokens * np.dtype(dtype).itemsize
    try:
        size = (entry / TOKENS).stat().st_size
    except FileNotFoundError:
        raise _Damaged(f"{TOKENS} is missing") from None
    if size != expected:
        raise _Damaged(f"{TOKENS} has {size} bytes, not {expected}")
    if n_tokens == 0:  # an empty text: nothing to map (mmap refuses an empty file)
        tokens = np.zeros(0, dtype=dtype)
    else:
        try:
            with open(entry / TOKENS, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as err:
            raise _Damaged(f"{TOKENS} is unreadable: {err.strerror or err}") from None
        tokens = np.frombuffer(mapped, dtype=dtype, count=n_tokens)
        if int(tokens.max()) >= len(vocab):  # read before MADV_RANDOM: one sequential pass, with read-ahead
            raise _Damaged(f"{TOKENS} holds ids beyond the {len(vocab)}-character vocabulary")
        if hasattr(mmap, "MADV_RANDOM"):
            # Blocks are read at random offsets: without this, each fault on a corpus that is not in
            # the page cache reads ahead (8 MB on some disks) far more than the block it needs.
            mapped.madvise(mmap.MADV_RANDOM)
    _check_against_text(meta, tokens, files)
    return meta, tokens


def _check_against_text(meta: dict, tokens: np.ndarray, files: list[Path]) -> None:
    """The entry describes these files: their sizes, plausible character counts, and the same
    characters as the ids at both ends of each file (see the module docstring for what it cannot see)."""
    vocab = meta["vocab"]
    if len(meta["files"]) != len(files):
        raise _Damaged(f"it records {len(meta['files'])} files, the data has {len(files)}")
    offset = 0
    for path, counts in zip(files, meta["files"]):
        head, tail, n_bytes = _ends(path)
        n = counts["tokens"]
        if counts["bytes"] != path.stat().st_size or not (n_bytes + 3) // 4 <= n <= n_bytes:
            raise _Damaged(f"its counts for {path.name} ({n} characters in {counts['bytes']} bytes) are not the text's")
        for text, start in ((head, offset), (tail, offset + n - len(tail))):
            ids = tokens[max(start, 0) : start + len(text)]
            if len(ids) != len(text) or "".join(vocab[i] for i in ids.tolist()) != text:
                raise _Damaged(f"its ids do not spell {path.name}'s text")
        offset += n


def _ends(path: Path) -> tuple[str, str, int]:
    """A file's first and last ``WINDOW`` bytes as whole characters, and its size without a BOM."""
    try:
        with open(path, "rb") as f:
            start = len(BOM) if f.read(len(BOM)) == BOM else 0
            size = os.fstat(f.fileno()).st_size
            f.seek(start)
            head = codecs.getincrementaldecoder("utf-8")().decode(f.read(WINDOW))  # drops a cut character
            f.seek(max(start, size - WINDOW))
            raw = f.read()
            cut = 0
            while cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # a character begun before the window
                cut += 1
            return head, raw[cut:].decode("utf-8"), size - start
    except (OSError, UnicodeDecodeError) as err:
        raise _Damaged(f"{path} reads differently now ({type(err).__name__})") from None


def remove_leftovers(root: Path, held: Optional[str] = None) -> None:
    """Remove the temporary folders that killed builds left: of key ``held``, whose build lock the
    caller holds, and of any key whose lock is free (no live builder owns them)."""
    if fcntl is None:  # no lock, so a leftover may be a live builder's: leave them all
        return
    for folder, key in cache_folders(root, leftover=True):
        try:
            if key == held:
                remove_marked(folder, key)
                continue
            with build_lock(root, key, wait=False):
                remove_marked(folder, key)
        except (OSError, UsageError):  # BlockingIOError: being built right now
            continue


def cache_folders(root: Path, leftover: bool = False) -> list[tuple[Path, str]]:
    """(folder, key) of the cache's entries, or of its builds' temporary folders (finished by a kill
    or still running): real folders (no links) named for their key and marked by this package."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    pattern = _LEFTOVER if leftover else _KEY
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        key = match and (match[1] if leftover else name)
        if key and marked(root / name, key):
            found.append((root / name, key))
    return found


def _umask() -> int:
    """The process's umask: the only way to read it is to set it, so set it straight back."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _writable(root: Path) -> Iterator[None]:
    """Any failure to write the cache (permissions, a full disk) as one line naming the way out."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as err:
        raise UsageError(
            f"cannot write the token cache in {root} ({err.strerror or err}); free some space there or set "
            "data.cache_dir to a writable folder with room for about the text's size."
        ) from None


@contextmanager
def build_lock(root: Path, key: str, wait: bool = True) -> Iterator[None]:
    """One builder per entry: other processes (runs started at once, or torchrun's ranks) wait for it.

    ``wait=False``: ``BlockingIOError`` if another process holds it. Opened read-only, so users who
    share the cache need no write permission on each other's lock files.
    """
    if fcntl is None:
        yield
        return
    with open_lock(root / f".{key}.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(path: Path, files: list[Path], entry: Path) -> None:
    """Read the text once into ``entry``; nothing is left behind unless the whole entry is complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        mark(tmp, entry.name)  # first: a kill from here on leaves a folder the clean-up may remove
        for id_type in ID_TYPES:
            try:
                chars, counts = _encode(files, tmp / TOKENS, id_type)
                break
            except _VocabularyOverflow:  # more characters than id_type holds: once more, wider
                continue
        meta = {
            "vocab": chars,
            "dtype": np.dtype(id_type).name,
            "n_tokens": sum(counts),
            "sources": [str(p.resolve()) for p in files],
            "files": [{"bytes": p.stat().st_size, "tokens": n} for p, n in zip(files, counts)],
        }
        with open(tmp / VOCAB, "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would shut other users out of a shared cache
        try:
            os.rename(tmp, entry)  # atomic; fails if another process has just put its own entry there
        except OSError:
            if not (entry / VOCAB).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _VocabularyOverflow(Exception):
    pass


def _encode(files: list[Path], out: Path, id_type) -> tuple[str, list[int]]:
    """One pass over the text: provisional ids (in order of first appearance) to ``out``, then renumbered.

    Returns the sorted vocabulary and each file's number of tokens.
    """
    capacity = np.iinfo(id_type).max + 1
    seen = np.zeros(0x110000, dtype=bool)
    provisional = np.zeros(0x110000, dtype=id_type)  # codepoint -> provisional id, where seen
    order: list[int] = []  # codepoints by provisional id
    counts = [0] * len(files)
    with open(out, "wb") as f:
        for index, codepoints in _codepoints(files):
            if codepoints.dtype == np.uint8:  # ASCII: mark the characters present
                present = np.zeros(256, dtype=bool)
                present[codepoints] = True
                new = np.flatnonzero(present & ~seen[:256])
            else:
                new = np.unique(codepoints[~seen[codepoints]])
            for cp in new.tolist():
                if len(order) == capacity:
                    raise _VocabularyOverflow
                seen[cp], provisional[cp] = True, len(order)
                order.append(cp)
            provisional[codepoints].tofile(f)
            counts[index] += len(codepoints)
        f.flush()
        os.fsync(f.fileno())
    n_tokens = sum(counts)
    # Renumber: provisional id -> index in the sorted vocabulary.
    renumber = np.empty(len(order), dtype=id_type)
    renumber[np.argsort(np.array(order, dtype=np.int64), kind="stable")] = np.arange(len(order), dtype=id_type)
    if n_tokens and not np.array_equal(renumber, np.arange(len(order))):
        tokens = np.memmap(out, dtype=id_type, mode="r+", shape=(n_tokens,))
        step = CHUNK_BYTES // np.dtype(id_type).itemsize
        for start in range(0, n_tokens, step):
            tokens[start : start + step] = renumber[tokens[start : start + step]]
        tokens.flush()
        del tokens
    return "".join(chr(cp) for cp in sorted(order)), counts


def _codepoints(files: list[Path]) -> Iterator[tuple[int, np.ndarray]]:
    """The corpus's characters as (file index, array of codepoints), a chunk at a time; a bad byte is one line."""
    for index, path in enumerate(files):
        decoder = codecs.getincrementaldecoder("utf-8")()
        with open(path, "rb") as f:
            offset = len(BOM) if f.read(len(BOM)) == BOM else 0  # a leading BOM is not text
            f.seek(offset)
            while True:
                chunk = f.read(CHUNK_BYTES)
                pending = decoder.getstate()[0]
                if not pending and chunk.isascii():  # fast path: ASCII bytes are their codepoints
                    if chunk:
                        yield index, np.frombuffer(chunk, dtype=np.uint8)
                else:
                    try:
                        text = decoder.decode(chunk, final=not chunk)
                    except UnicodeDecodeError as err:
                        raise UsageError(
                            f"data file {path} is not UTF-8 text (byte {offset - len(pending) + err.start}); "
                            "convert it to UTF-8."
                        ) from None
                    if text:
                        yield index, np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
                if not chunk:
                    break
                offset += len(chunk)


def check_splits(n_tokens: int, path: Path, block_size: int, train_fraction: float) -> int:
    """The train split's length, once both splits are checked to hold a block and its target."""
    n_train = int(train_fraction * n_tokens)
    for split, length in (("train", n_train), ("val", n_tokens - n_train)):
        if length < block_size + 1:
            raise UsageError(
                f"the {split} split of {path} has {length} characters, fewer than block_size + 1 = "
                f"{block_size + 1}: use a longer text or a smaller data.block_size."
            )
    return n_train
