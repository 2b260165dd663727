"""Install once, run anywhere: a wheel installed outside the repository trains, generates and lists
its configs from an empty directory; ``--config`` takes shipped names; ``--ckpt_path auto``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY
from nanogpt_pl.cli import main
from test_checkpointing import small_v7

# v7 at a few milliseconds per step: its architecture and dropout, tiny sizes, fp32, no fused AdamW.
SMALL_V7 = [
    "--model.config.n_embd", "32", "--model.config.n_head", "2", "--model.config.n_layer", "1",
    "--data.block_size", "16", "--data.batch_size", "4", "--trainer.precision", "32",
    "--model.optimizer.init_args.fused", "false",
]


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the repository, installed with ``pip install --target``."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy: building in place would leave build/ in the repository
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "tb_logs", "build", "*.egg-info", "__pycache__", ".venv", "results", "docs", "benchmarks"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "wheel").glob("nanogpt_pl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return tmp / "site"


def run_installed(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed package, with the test environment's dependencies and no repository on the path."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-m", "nanogpt_pl", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_installed_wheel_trains_generates_and_lists_from_an_empty_directory(installed, tmp_path):
    before = listing(installed)
    work = tmp_path / "anywhere"
    work.mkdir()

    listed = run_installed(installed, "configs", cwd=work).stdout
    assert str(installed / "nanogpt_pl" / "configs") in listed, "the listing reads the installed configs"
    rows = {line.split()[0]: line for line in listed.splitlines()[1:-1]}
    assert list(rows) == [p.stem for p in sorted((REPO / "configs").glob("*.yaml"))]
    assert "self-attention" in rows["v2"] and "4,977" in rows["v2"] and "val 2.4084" in rows["v2"]
    assert "scaled up" in rows["v7"] and "10,788,929" in rows["v7"] and "train 1.0763, val 1.4873" in rows["v7"]

    run_installed(installed, "fit", "--config", "v2.yaml", *TINY, cwd=work)
    assert (work / "tb_logs/v2/version_0/checkpoints/last.ckpt").is_file()
    # --ckpt_path auto with nothing to resume starts fresh (a requeued job's first start).
    run_installed(installed, "fit", "--config=v7", *TINY, *SMALL_V7, "--ckpt_path", "auto", cwd=work)
    checkpoint = work / "tb_logs/v7/version_0/checkpoints/last.ckpt"
    hparams = torch.load(checkpoint, weights_only=True)["datamodule_hyper_parameters"]
    assert Path(hparams["data_path"]) == installed / "nanogpt_pl/tinyshakespeare/input.txt"

    sample = run_installed(installed, "generate", "--ckpt_path", str(checkpoint), "--max_new_tokens", "50", cwd=work).stdout
    assert len(sample.strip()) > 0

    assert sorted(p.name for p in work.iterdir()) == ["tb_logs"], "outputs land where the user stands"
    assert listing(installed) == before, "nothing is written into the installed package"

    script = installed / "bin" / "nanogpt-pl"
    version = subprocess.run([sys.executable, str(script), "--version"], env={**os.environ, "PYTHONPATH": str(installed)},
                             cwd=work, capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == "nanogpt-pl 0.1.0"


def test_a_local_file_named_like_a_shipped_config_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v2.yaml").write_text("data:\n  batch_size: 3\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "v2.yaml", "--print_config"])
    assert "batch_size: 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--config", "v2", "--print_config"])  # no file named v2 here: the shipped one
    printed = capsys.readouterr().out
    assert "batch_size: 32" in printed and "n_embd: 32" in printed


@pytest.mark.parametrize(
    "value, message",
    [
        ("v9", "--config v9: no such file here, nor a shipped config; choose a path or one of v1, v2,"),
        ("folder", "--config folder is a directory; name a YAML file"),
        ("broken.yaml", "--config broken.yaml, line 2 is not valid YAML"),
    ],
)
def test_bad_config_names_are_one_line_each(value, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.yaml").write_text("model: [\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "folder"], "nothing written"


def test_ckpt_path_auto_continues_the_newest_run(small_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", *small_v7(small_text, steps=2, n_layer=1), "--ckpt_path", "auto"])
    main(["fit", *small_v7(small_text, steps=3, n_layer=1), "--ckpt_path", "auto"])
    assert "done: steps 2-3 in" in capsys.readouterr().out
    assert not (tmp_path / "tb_logs/v7/version_1").exists(), "auto continues the same run"
