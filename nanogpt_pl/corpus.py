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
  in anyway. Ids that are wrong but in range (a flipped bit that names another character) pass;
  only a checksum, read in full on every run, would catch those.
- Default cache dir: ``$XDG_CACHE_HOME/nanogpt_pl`` (``~/.cache/nanogpt_pl``), never beside the
  text, which may live inside an installed package.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from nanogpt_pl.errors import UsageError

try:  # serializes builds of one entry across processes; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows: concurrent builds stay correct, only wasteful
    fcntl = None

FORMAT = 1  # bump when the entry's layout changes: old entries are then simply not found
CHUNK_BYTES = 1 << 24  # 16 MiB of text per step of the pass: bounded memory, few Python iterations
BOM = codecs.BOM_UTF8
ID_TYPES = (np.uint8, np.uint16, np.uint32)
TOKENS, VOCAB = "tokens.bin", "vocab.json"


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
        opened = _open(entry)
    except _Damaged:
        opened = None  # repaired below, under the lock, once no other process is at it
    if opened is None:
        with _writable(root), build_lock(root, entry.name):
            _remove_leftovers(root, entry.name)
            try:
                opened = _open(entry)  # another process may have built it while we waited
            except _Damaged as why:
                print(f"note: the token cache entry {entry} is damaged ({why}); rebuilding it.", file=sys.stderr)
                shutil.rmtree(entry)
            if opened is None:
                _build(path, files, entry)
                opened = _open(entry)
    meta, tokens = opened
    if meta["n_tokens"] == 0:
        what = "data folder" if path.is_dir() else "data file"
        raise UsageError(f"{what} {path} is empty; point data.data_path to a text to train on.")
    return Corpus(meta["vocab"], tokens, path)


class _Damaged(Exception):
    """An entry that exists but cannot be trusted; its message says why, for the note."""


def _open(entry: Path) -> Optional[tuple[dict, np.ndarray]]:
    """The entry's metadata and memory-mapped ids; None if there is no entry; ``_Damaged`` if it is wrong."""
    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / VOCAB).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Damaged(f"{VOCAB} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _Damaged(f"{VOCAB} is unreadable: {err}") from None
    fields = {"vocab": str, "dtype": str, "n_tokens": int, "sources": list}
    if not isinstance(meta, dict) or any(type(meta.get(k)) is not t for k, t in fields.items()):
        raise _Damaged(f"{VOCAB} lacks one of {', '.join(fields)} or has the wrong type")
    vocab, dtype, n_tokens = meta["vocab"], meta["dtype"], meta["n_tokens"]
    if dtype not in [np.dtype(t).name for t in ID_TYPES] or n_tokens < 0 or list(vocab) != sorted(set(vocab)):
        raise _Damaged(f"{VOCAB} has an unknown id type, a negative count or an unsorted vocabulary")
    expected = n_tokens * np.dtype(dtype).itemsize
    try:
        size = (entry / TOKENS).stat().st_size
    except FileNotFoundError:
        raise _Damaged(f"{TOKENS} is missing") from None
    if size != expected:
        raise _Damaged(f"{TOKENS} has {size} bytes, not {expected}")
    if n_tokens == 0:  # an empty text: nothing to map (mmap refuses an empty file)
        return meta, np.zeros(0, dtype=dtype)
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
    return meta, tokens


def _remove_leftovers(root: Path, key: str) -> None:
    """The temporary folders that killed builds of ``key`` left; the caller holds the key's lock."""
    if fcntl is None:  # no lock, so a leftover may be a live builder's: leave them all
        return
    for leftover in root.glob(f".{key}.*"):
        if leftover.is_dir():  # not the lock file
            shutil.rmtree(leftover, ignore_errors=True)


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
def build_lock(root: Path, key: str) -> Iterator[None]:
    """One builder per entry: other processes (runs started at once, or torchrun's ranks) wait for it."""
    if fcntl is None:
        yield
        return
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(path: Path, files: list[Path], entry: Path) -> None:
    """Read the text once into ``entry``; nothing is left behind unless the whole entry is complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for id_type in ID_TYPES:
            try:
                chars, n_tokens = _encode(files, tmp / TOKENS, id_type)
                break
            except _VocabularyOverflow:  # more characters than id_type holds: once more, wider
                continue
        meta = {
            "vocab": chars,
            "dtype": np.dtype(id_type).name,
            "n_tokens": n_tokens,
            "sources": [str(p.resolve()) for p in files],
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


def _encode(files: list[Path], out: Path, id_type) -> tuple[str, int]:
    """One pass over the text: provisional ids (in order of first appearance) to ``out``, then renumbered.

    Returns the sorted vocabulary and the number of tokens.
    """
    capacity = np.iinfo(id_type).max + 1
    seen = np.zeros(0x110000, dtype=bool)
    provisional = np.zeros(0x110000, dtype=id_type)  # codepoint -> provisional id, where seen
    order: list[int] = []  # codepoints by provisional id
    n_tokens = 0
    with open(out, "wb") as f:
        for codepoints in _codepoints(files):
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
            n_tokens += len(codepoints)
        f.flush()
        os.fsync(f.fileno())
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
    return "".join(chr(cp) for cp in sorted(order)), n_tokens


def _codepoints(files: list[Path]) -> Iterator[np.ndarray]:
    """The corpus's characters as arrays of codepoints, a chunk at a time; a bad byte is one line."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        with open(path, "rb") as f:
            offset = len(BOM) if f.read(len(BOM)) == BOM else 0  # a leading BOM is not text
            f.seek(offset)
            while True:
                chunk = f.read(CHUNK_BYTES)
                pending = decoder.getstate()[0]
                if not pending and chunk.isascii():  # fast path: ASCII bytes are their codepoints
                    if chunk:
                        yield np.frombuffer(chunk, dtype=np.uint8)
                else:
                    try:
                        text = decoder.decode(chunk, final=not chunk)
                    except UnicodeDecodeError as err:
                        raise UsageError(
                            f"data file {path} is not UTF-8 text (byte {offset - len(pending) + err.start}); "
                            "convert it to UTF-8."
                        ) from None
                    if text:
                        yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
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
