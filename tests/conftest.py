"""Shared fixtures: the repository's paths, a small text, and ways to run the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# GPTConfig's flags for the changes after the lecture; the lecture's reference formulation has none.
AFTER_LECTURE = {"positions", "norm", "activation", "qk_norm", "zero_init_proj", "tie_weights"}


def _lecture_configs() -> list[Path]:
    """One config per architecture of the lecture's kind (the optimizer-only ablations share v7_cpu's)."""
    chosen: dict[str, Path] = {}
    for path in CONFIGS:
        spec = yaml.safe_load(path.read_text())
        if not AFTER_LECTURE & set(spec["model"]["config"]):
            chosen.setdefault(json.dumps([spec["model"]["config"], spec["data"].get("block_size")], sort_keys=True), path)
    return list(chosen.values())


LECTURE_CONFIGS = _lecture_configs()
SHAKESPEARE = REPO / "data" / "tinyshakespeare" / "input.txt"

# Overrides that shrink any config to a few seconds on a CPU: a handful of steps, an estimate
# every two steps over two batches, and no progress bar in captured output.
TINY = [
    "--trainer.max_steps", "4",
    "--trainer.val_check_interval", "2",
    "--data.eval_iters", "2",
    "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false",
]


@pytest.fixture(scope="session", autouse=True)
def session_token_cache(tmp_path_factory) -> Path:
    """The token cache in a temporary folder from the start of the session, so module-scoped
    fixtures that train never write the user's ~/.cache either."""
    cache = tmp_path_factory.mktemp("session-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        yield cache / "nanogpt_pl"


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test's own, empty token cache: tests never write the user's ~/.cache, nor see another test's."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache / "nanogpt_pl"


def fit_in(root: Path, *args: str) -> Path:
    """``fit ARGS`` run in ``root`` on the first 20,000 characters of Tiny Shakespeare (``root/small.txt``,
    returned), as a user standing in that folder would: fixtures that share one trained run use it."""
    text = root / "small.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    from nanogpt_pl.cli import main

    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", "--data.data_path", str(text), *args])
    finally:
        os.chdir(cwd)
    return text


@pytest.fixture
def small_text(tmp_path: Path) -> Path:
    """The first 20,000 characters of Tiny Shakespeare: every character class, trains in seconds."""
    path = tmp_path / "small.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m nanogpt_pl ARGS`` in a fresh process, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_pl", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
