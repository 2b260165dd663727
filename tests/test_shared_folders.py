"""Folders shared with other users and runs: nothing outside this package's own files is written
through a link, truncated or deleted, and a killed build's leftovers are found and removed."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from nanogpt_pl import corpus
from nanogpt_pl.run import files
from nanogpt_pl.run.checkpoint import AtomicCheckpointIO
from nanogpt_pl.run.folders import RunFolder
from nanogpt_pl.cli import main
from nanogpt_pl.corpus import load_corpus
from nanogpt_pl.errors import UsageError


@pytest.fixture
def victim(tmp_path):
    """A file of the user's that a planted link points at: it must come out unchanged."""
    path = tmp_path / "victim.txt"
    path.write_text("the user's own file\n")
    return path


def text(tmp_path, name="t.txt", content="to be or not to be\n" * 30):
    path = tmp_path / name
    path.write_text(content)
    return path


def test_prune_and_clear_remove_only_what_the_cache_wrote(tmp_path, capsys):
    cache = tmp_path / "shared"
    ours = cache / corpus.cache_key([load_corpus(text(tmp_path), cache).path])
    user = cache / ("ab" * 16)  # named like an entry, no marker: the user's
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    (cache / f".{'cd' * 16}.lock").write_text("a hidden file named like a lock")
    elsewhere = tmp_path / "elsewhere"
    load_corpus(text(tmp_path, "u.txt", "other text\n" * 30), elsewhere)
    (cache / ("ef" * 16)).symlink_to(next(elsewhere.glob("[0-9a-f]" * 32)))  # a link to a real entry
    main(["cache", "--cache_dir", str(cache), "--prune", "true"])
    main(["cache", "--cache_dir", str(cache), "--clear", "true"])
    out = capsys.readouterr().out
    assert "1 entries" in out and "removed" in out, out
    assert not ours.exists()
    assert (user / "thesis.tex").read_text() == "precious"
    assert (cache / f".{'cd' * 16}.lock").read_text() == "a hidden file named like a lock"
    assert len(list(elsewhere.glob("[0-9a-f]" * 32))) == 1  # the link's target is no entry of this cache


def test_a_killed_builds_leftover_is_listed_and_cleared_unless_a_build_holds_it(tmp_path, capsys):
    cache, path = tmp_path / "cache", text(tmp_path)
    load_corpus(path, cache)
    dead, alive = "12" * 16, "34" * 16
    for key in (dead, alive):
        folder = cache / f".{key}.x7k2p9q1"
        folder.mkdir()
        files.mark(folder, key)
        (folder / corpus.TOKENS).write_bytes(b"\0" * 4096)
    with files.open_lock(cache / f".{alive}.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build of that text under way in another process
        main(["cache", "--cache_dir", str(cache)])
        listing = capsys.readouterr().out
        main(["cache", "--cache_dir", str(cache), "--clear", "true"])
        cleared = capsys.readouterr().out
    assert listing.count("  leftover  ") == 2 and "1 entries and 2 leftover build folders" in listing, listing
    assert "building" in cleared and not (cache / f".{dead}.x7k2p9q1").exists(), cleared
    assert (cache / f".{alive}.x7k2p9q1").exists()


def test_cache_lists_a_damaged_entry_and_prunes_it(tmp_path, capsys):
    cache = tmp_path / "cache"
    load_corpus(text(tmp_path), cache)
    (entry,) = cache.glob("[0-9a-f]" * 32)
    (entry / corpus.VOCAB).write_text("[" * 200_000 + "]" * 200_000)
    main(["cache", "--cache_dir", str(cache)])
    assert "damaged" in capsys.readouterr().out
    main(["cache", "--cache_dir", str(cache), "--prune", "true"])
    assert "removed" in capsys.readouterr().out and not entry.exists()


def test_a_link_at_a_lock_is_refused_and_its_target_untouched(tmp_path, victim, capsys):
    cache, path = tmp_path / "cache", text(tmp_path)
    cache.mkdir()
    (cache / f".{corpus.cache_key([path])}.lock").symlink_to(victim)
    with pytest.raises(UsageError, match="is a symbolic link, not a lock file"):
        load_corpus(path, cache)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".run.lock").symlink_to(victim)
    with pytest.raises(UsageError, match="is a symbolic link, not a lock file"):
        RunFolder.lock(run)
    hard = tmp_path / "hard"
    hard.mkdir()
    os.link(victim, hard / ".run.lock")
    with pytest.raises(UsageError, match="is a hard link to another file"):
        RunFolder.lock(hard)
    assert victim.read_text() == "the user's own file\n"


def test_a_run_folder_whose_config_is_a_link_is_refused_before_training(tmp_path, victim):
    run = tmp_path / "version_0"
    run.mkdir()
    (run / "config.yaml").symlink_to(victim)  # Lightning would rewrite config.yaml through it
    with pytest.raises(UsageError, match="config.yaml \\(a symbolic link, which the write would follow\\)"):
        RunFolder.lock(run)
    assert victim.read_text() == "the user's own file\n"


def test_atomic_writes_never_write_through_a_link(tmp_path, victim):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".last.ckpt.partial").symlink_to(victim)  # planted at the temporary name
    AtomicCheckpointIO().save_checkpoint({"step": 1}, folder / "last.ckpt")
    (folder / "results.md").symlink_to(victim)  # planted at the target's name
    files.write_text_atomic(folder / "results.md", "# results\n")
    assert victim.read_text() == "the user's own file\n"
    assert (folder / "results.md").read_text() == "# results\n" and not (folder / "results.md").is_symlink()
    assert AtomicCheckpointIO().load_checkpoint(folder / "last.ckpt") == {"step": 1}
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "results.md"]


def test_a_reproduction_folder_is_locked_against_a_second(tmp_path, capsys):
    from nanogpt_pl.reproduce import _lock_out

    with _lock_out(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            main(["reproduce", "--out", str(tmp_path), "--versions", "v2", "--seeds", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert f"{tmp_path} is in use by another reproduce" in err
    assert not (tmp_path / "runs").exists()


def test_the_entry_records_its_text(tmp_path):
    path, cache = text(tmp_path, content="héllo wörld\n" * 500), tmp_path / "cache"
    load_corpus(path, cache)
    ((entry, _),) = corpus.cache_folders(cache)
    meta = json.loads((entry / corpus.VOCAB).read_text())
    assert meta["files"] == [{"bytes": path.stat().st_size, "tokens": len(path.read_text())}]


def test_reproduce_never_clears_a_folder_that_no_run_wrote(tmp_path, capsys):
    mine = tmp_path / "runs" / "v2" / "seed1"
    mine.mkdir(parents=True)
    (mine / "notes.md").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--out", str(tmp_path), "--versions", "v2", "--seeds", "1", "--max_steps", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"{mine} holds files that no run wrote" in err, err
    assert (mine / "notes.md").read_text() == "mine"
