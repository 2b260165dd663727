"""The token cache: the same ids and blocks as the in-memory path, never stale, and every failure one line."""

from __future__ import annotations

import errno
import json
import os
import stat
import time

import numpy as np
import pytest
import torch

from conftest import CONFIGS, SHAKESPEARE, TINY
from nanogpt_pl import corpus
from nanogpt_pl.run import files
from nanogpt_pl.cli import main
from nanogpt_pl.corpus import load_corpus
from nanogpt_pl.data import CharDataModule, CharTokenizer, vocab_size_of
from nanogpt_pl.errors import UsageError


def in_memory_sample(data: torch.Tensor, block_size: int, batch_size: int, n_batches: int, generator):
    """The sampler as it was before the cache: the whole text as one int64 tensor."""
    ix = torch.randint(len(data) - block_size, (n_batches * batch_size,), generator=generator)
    offsets = ix.to(data.device)[:, None] + torch.arange(block_size + 1, device=data.device)
    blocks = data[offsets]
    return blocks[:, :-1], blocks[:, 1:]


def test_tiny_shakespeare_gives_the_same_ids_and_blocks_as_in_memory():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = int(0.9 * len(data))
    reference = {"train": data[:n], "val": data[n:]}
    dm = CharDataModule(data_path=str(SHAKESPEARE), block_size=32, batch_size=16)
    dm.setup("fit")
    assert dm.tokenizer.chars == tokenizer.chars
    assert dm._splits["train"].dtype == np.uint8
    assert np.array_equal(np.concatenate([dm._splits["train"], dm._splits["val"]]), data.numpy())
    for split, n_batches in (("train", 1), ("val", 5), ("train", 3)):
        ours, theirs = torch.Generator().manual_seed(1337), torch.Generator().manual_seed(1337)
        for _ in range(3):
            x, y = dm.sample(split, n_batches, ours)
            x_ref, y_ref = in_memory_sample(reference[split], 32, 16, n_batches, theirs)
            assert x.dtype == x_ref.dtype and torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_chunk_boundaries_and_wide_vocabularies_keep_the_ids(tmp_path, monkeypatch):
    # 300 distinct characters (uint16), multi-byte ones split across 7-byte chunks, ASCII runs between.
    text = "".join(chr(0x400 + i) + "ab\n" + chr(0x1F600 + i % 40) for i in range(300)) * 3
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 7)
    loaded = load_corpus(path, tmp_path / "cache")
    tokenizer = CharTokenizer.from_text(text)
    assert loaded.chars == tokenizer.chars and loaded.tokens.dtype == np.uint16
    assert loaded.tokens.tolist() == tokenizer.encode(text)


def test_a_folder_is_its_txt_files_in_order_without_byte_order_marks(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "b.txt").write_bytes(corpus.BOM + "second book\n".encode())
    (folder / "a.txt").write_text("first book\n" * 3, encoding="utf-8")
    (folder / "notes.md").write_text("not part of it: Z")
    loaded = load_corpus(folder, tmp_path / "cache")
    assert CharTokenizer(loaded.chars).decode(loaded.tokens.tolist()) == "first book\n" * 3 + "second book\n"
    assert "\ufeff" not in loaded.chars and "Z" not in loaded.chars


def test_an_edited_text_is_never_served_stale(tmp_path):
    path, cache = tmp_path / "t.txt", tmp_path / "cache"
    path.write_text("abcabc" * 10)
    assert load_corpus(path, cache).chars == "abc"
    stat = path.stat()
    path.write_text("xyzxyz" * 10)  # same size; the modification time is what tells them apart
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert load_corpus(path, cache).chars == "xyz"
    assert vocab_size_of(str(path), 4, 0.9, str(cache)) == 3


def entries(cache) -> list:
    """What the cache holds besides its lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def test_an_edit_that_keeps_size_and_mtime_gives_a_new_key(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabc" * 10)
    before, key = path.stat(), corpus.cache_key([path])
    time.sleep(0.05)  # past the kernel's coarse clock tick, as any real edit is
    path.write_text("xyzxyz" * 10)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert corpus.cache_key([path]) != key
    assert load_corpus(path, tmp_path / "cache").chars == "xyz"


def tokens_of(entry):
    return entry / corpus.TOKENS


def vocab_of(entry):
    return entry / corpus.VOCAB


DAMAGE = {
    "truncated tokens.bin": (lambda e: tokens_of(e).write_bytes(tokens_of(e).read_bytes()[:-7]),
                             "tokens.bin has"),
    "zero-byte tokens.bin": (lambda e: tokens_of(e).write_bytes(b""), "tokens.bin has 0 bytes"),
    "random tokens.bin of the right size": (
        lambda e: np.random.default_rng(0).integers(0, 256, tokens_of(e).stat().st_size, dtype=np.uint8)
        .tofile(tokens_of(e)), "ids beyond"),
    "missing tokens.bin": (lambda e: tokens_of(e).unlink(), "tokens.bin is missing"),
    "missing vocab.json": (lambda e: vocab_of(e).unlink(), "vocab.json is missing"),
    "corrupt vocab.json": (lambda e: vocab_of(e).write_text('{"vocab": "abc", "dty'), "vocab.json is unreadable"),
    "vocab.json without a field": (
        lambda e: vocab_of(e).write_text(json.dumps({k: v for k, v in json.loads(vocab_of(e).read_text()).items()
                                                     if k != "dtype"})), "lacks one of"),
    "vocab.json nested 200,000 deep": (lambda e: vocab_of(e).write_text("[" * 200_000 + "]" * 200_000),
                                       "vocab.json is unreadable: RecursionError"),
    "a consistent record of an empty text": (
        lambda e: (tokens_of(e).write_bytes(b""), vocab_of(e).write_text(json.dumps(
            {**json.loads(vocab_of(e).read_text()), "vocab": "", "n_tokens": 0,
             "files": [{**json.loads(vocab_of(e).read_text())["files"][0], "tokens": 0}]}))),
        "its counts for t.txt (0 characters"),
    "a vocabulary of other characters, as many": (
        lambda e: vocab_of(e).write_text(json.dumps({**json.loads(vocab_of(e).read_text()), "vocab": "".join(
            sorted(chr(ord(c) + 0x400) for c in json.loads(vocab_of(e).read_text())["vocab"]))})),
        "its ids do not spell t.txt's text"),
    "vocab.json with a shorter vocabulary": (
        lambda e: vocab_of(e).write_text(json.dumps({**json.loads(vocab_of(e).read_text()), "vocab": "\n "})),
        "ids beyond the 2-character vocabulary"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_rebuilt_with_one_note(damage, tmp_path, capsys):
    path, cache = tmp_path / "t.txt", tmp_path / "cache"
    path.write_text("hello world, said the cache\n" * 40)
    fresh = load_corpus(path, tmp_path / "fresh")
    load_corpus(path, cache)
    entry = cache / corpus.cache_key([path])
    damage_it, why = DAMAGE[damage]
    damage_it(entry)
    capsys.readouterr()
    repaired = load_corpus(path, cache)
    err = capsys.readouterr().err
    assert err.startswith(f"note: the token cache entry {entry} is damaged (") and why in err, err
    assert err.endswith("; rebuilding it.\n") and err.count("\n") == 1, err
    assert repaired.chars == fresh.chars and np.array_equal(repaired.tokens, fresh.tokens)
    assert entries(cache) == [entry.name]
    load_corpus(path, cache)  # healthy again: opened without a note
    assert capsys.readouterr().err == ""


def leftover(cache, key, name="k1ll3d00", marked=True):
    """A build's temporary folder as a killed build leaves it (named as tempfile.mkdtemp names them)."""
    folder = cache / f".{key}.{name}"
    folder.mkdir(parents=True)
    if marked:
        files.mark(folder, key)
    (folder / corpus.TOKENS).write_bytes(b"\0" * 10)
    return folder


def test_a_killed_builds_temporary_folder_is_removed_and_only_such(tmp_path):
    path, cache = tmp_path / "t.txt", tmp_path / "cache"
    path.write_text("abc" * 20)
    key, other_key = corpus.cache_key([path]), "0123456789abcdef0123456789abcdef"
    leftover(cache, key)
    leftover(cache, other_key)  # another text's killed build: its lock is free, so no one builds it
    unmarked = leftover(cache, other_key, "u53rd1r0", marked=False)  # named like one, not written by us
    assert load_corpus(path, cache).chars == "abc"
    assert entries(cache) == [unmarked.name, key]


def test_a_folder_in_the_way_of_an_entry_is_never_deleted(tmp_path, capsys):
    path, cache = tmp_path / "t.txt", tmp_path / "cache"
    path.write_text("abc" * 20)
    theirs = cache / corpus.cache_key([path])
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is in the way of the token cache and was not written by nanogpt_pl"):
        load_corpus(path, cache)
    assert (theirs / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)], ids=["022", "002", "077"])
def test_the_entry_mode_follows_the_umask(umask, mode, tmp_path):
    path, cache = tmp_path / "t.txt", tmp_path / "cache"
    path.write_text("abc" * 20)
    old = os.umask(umask)
    try:
        load_corpus(path, cache)
    finally:
        os.umask(old)
    assert stat.S_IMODE((cache / corpus.cache_key([path])).stat().st_mode) == mode


def test_a_bad_byte_deep_inside_is_named_and_leaves_no_cache(tmp_path, monkeypatch):
    path, cache = tmp_path / "big.txt", tmp_path / "cache"
    path.write_bytes("é".encode() * 5000 + b"\xff" + b"tail" * 100)
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 999)  # odd: chunks end inside characters
    with pytest.raises(UsageError, match=rf"{path} is not UTF-8 text \(byte 10000\)"):
        load_corpus(path, cache)
    assert entries(cache) == []


def test_a_full_disk_leaves_no_cache(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(corpus.os, "fsync", full)
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match="No space left on device.*data.cache_dir") as info:
        load_corpus(SHAKESPEARE, cache)
    assert "\n" not in str(info.value) and entries(cache) == []


def run_main(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


BAD_CORPORA = {
    "not UTF-8": (lambda t: ["--data.data_path", write_bytes(t / "bad.txt", b"ok\n" * 50 + b"\xc3(")],
                  "bad.txt is not UTF-8 text (byte 150)"),
    "folder without .txt files": (lambda t: ["--data.data_path", str(make_folder(t / "empty_folder"))],
                                  "holds no .txt files"),
    "unwritable cache location": (lambda t: ["--data.cache_dir", write_bytes(t / "a_file", b"")],
                                  "set data.cache_dir to a writable folder"),
}


def write_bytes(path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def make_folder(path):
    path.mkdir()
    (path / "readme.md").write_text("no texts here")
    return path


@pytest.mark.parametrize("name", BAD_CORPORA)
def test_bad_corpora_are_one_line_and_write_nothing(name, tmp_path, monkeypatch, capsys):
    extra, message = BAD_CORPORA[name]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    line = run_main(["fit", "--config", str(CONFIGS[1]), "--data.data_path", str(SHAKESPEARE), *TINY,
                     *extra(tmp_path)], capsys)
    assert message in line
    assert list(work.iterdir()) == [], "a failed start left files behind"


def test_a_folder_trains_from_the_command_line(tmp_path, monkeypatch, token_cache):
    folder = tmp_path / "texts"
    folder.mkdir()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    (folder / "1.txt").write_text(text[:12_000], encoding="utf-8")
    (folder / "2.txt").write_text(text[12_000:], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS[1]), "--data.data_path", str(folder), *TINY])
    ckpt = next((tmp_path / "tb_logs").rglob("*.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["CharDataModule"]["vocab"] == "".join(sorted(set(text)))
    assert len(entries(token_cache)) == 1  # built once, at parse time; fit mapped the same entry


def test_a_stream_saved_on_another_kind_of_device_restarts_with_a_warning(small_text):
    dm = CharDataModule(data_path=str(small_text), block_size=8, batch_size=4)
    dm.setup("fit")
    fresh = dm._generators["train"].get_state()
    cuda_like = {"train": torch.zeros(16, dtype=torch.uint8), "eval": dm._generators["eval"].get_state()}
    with pytest.warns(UserWarning, match="'train' sampling stream was drawn on another kind of device"):
        dm.load_state_dict({"vocab": dm.tokenizer.chars, "generators": cuda_like})
    assert torch.equal(dm._generators["train"].get_state(), fresh)


def test_the_cache_command_lists_prunes_the_stale_and_clears(tmp_path, capsys):
    from nanogpt_pl.cli import main

    cache_dir = tmp_path / "cache"
    kept, edited = tmp_path / "kept.txt", tmp_path / "edited.txt"
    kept.write_text("to be or not to be\n" * 50)
    edited.write_text("all the world's a stage\n" * 50)
    load_corpus(kept, cache_dir)
    load_corpus(edited, cache_dir)
    edited.write_text("all the world's a stage, and all the men and women merely players\n" * 50)
    load_corpus(edited, cache_dir)  # a new entry; the old one can never be opened again
    main(["cache", "--cache_dir", str(cache_dir)])
    lines = capsys.readouterr().out.splitlines()
    assert sum("stale" in line for line in lines) == 1 and sum("current" in line for line in lines) == 2, lines
    assert "3 entries" in lines[-1]
    main(["cache", "--cache_dir", str(cache_dir), "--prune", "true"])
    assert "removed" in capsys.readouterr().out
    assert len([p for p in cache_dir.iterdir() if not p.name.startswith(".")]) == 2
    assert load_corpus(edited, cache_dir).chars == "".join(sorted(set(edited.read_text())))  # current ones stay
    (cache_dir / "notes").mkdir()  # not an entry: never touched
    main(["cache", "--cache_dir", str(cache_dir), "--clear", "true"])
    capsys.readouterr()
    assert [p.name for p in cache_dir.iterdir()] == ["notes"]
    main(["cache", "--cache_dir", str(cache_dir)])
    assert "empty" in capsys.readouterr().out
