"""benchmarks/gpu.py cannot rot between GPU runs: its --smoke mode runs every part on a CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

PARTS = ["cuda_tests", "v7", "v7_compile", "small", "generate", "ddp", "profile"]


def test_smoke_runs_every_part_and_writes_both_records(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    [record_path] = tmp_path.glob("*-smoke.json")
    assert record_path.with_suffix(".md").is_file()
    record = json.loads(record_path.read_text(encoding="utf-8"))
    assert record["smoke"] and record["torch"] and record["lightning"] and record["device"]
    parts = record["parts"]
    assert list(parts) == PARTS
    for name, part in parts.items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        if part["status"] == "skipped":
            assert part["reason"], name
    assert parts["cuda_tests"] == {**parts["cuda_tests"], "status": "skipped", "reason": "no CUDA"}

    v7 = parts["v7"]["result"]
    assert v7["steps"] == 4 and v7["val"] > 0 and v7["train"] > 0 and v7["tokens_per_sec"] > 0
    assert "reproduce --versions v7" in v7["command"]
    # Only the summary comes back, within what a GPU machine returns; the runs stay in their temporary folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [record_path.name, record_path.with_suffix(".md").name, "results.json", "profile.txt"])
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"v7"}
    assert "aten::" in (tmp_path / "profile.txt").read_text()
    assert "reproduce --versions v2,v6" in parts["small"]["result"]["command"]
    for name in ("v2", "v6"):
        small = parts["small"]["result"][name]
        assert small["val"] > 0 and small["cpu_wall_s"] > 0 and small["wall_over_cpu"] > 0
    assert parts["generate"]["result"]["sample"]
    ddp = parts["ddp"]["result"]
    assert ddp["stopped_near_step"] < ddp["resumed_to_step"] == 40  # stopped by SIGTERM, then finished
    assert "aten::" in parts["profile"]["result"]["table"]
    markdown = record_path.with_suffix(".md").read_text(encoding="utf-8")
    assert all(f"## {name}:" in markdown for name in PARTS) and "skipped: no CUDA" in markdown


def load_gpu_script():
    spec = importlib.util.spec_from_file_location("gpu_script", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_caps_fit_the_window_and_a_part_past_its_cap_is_stopped(tmp_path):
    gpu = load_gpu_script()
    assert set(gpu.CAPS) == set(gpu.PARTS) and sum(gpu.CAPS.values()) <= 7 * 60
    bench = gpu.Bench(tmp_path / "work", tmp_path / "out", smoke=False)
    bench.deadline = time.monotonic() + 1
    start = time.monotonic()
    with pytest.raises(gpu.OverCap):
        bench.run([sys.executable, "-c", "import time; time.sleep(60)"])
    assert time.monotonic() - start < 30  # stopped at the cap, not left to finish


def test_output_limits_are_what_a_gpu_machine_returns(tmp_path, monkeypatch):
    gpu = load_gpu_script()
    monkeypatch.setenv("PYTHONPATH", "/wheels")
    assert gpu.child_env()["PYTHONPATH"] == os.pathsep.join([str(REPO), "/wheels"])  # kept, after the checkout
    for i in range(8):
        (tmp_path / f"{i}.json").write_text("{}")
    assert gpu.check_output_limits(tmp_path) == []
    (tmp_path / "8.json").write_text("{}")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "event").write_bytes(b"x")
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(16 * 2**20 + 1)
    problems = "; ".join(gpu.check_output_limits(tmp_path))
    assert "11 files" in problems and "runs/event: in a sub-folder" in problems and "big.bin" in problems


def test_the_bundle_holds_what_a_gpu_machine_lacks_and_installs_beside_it(tmp_path):
    bundle = tmp_path / "bundle"
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_bundle.sh"), str(bundle)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name.split("-")[0] for p in bundle.glob("*.whl")}
    assert names == {"jsonargparse", "docstring_parser", "typeshed_client", "typing_extensions", "nanogpt_pl"}
    assert sum(p.stat().st_size for p in bundle.iterdir()) <= 60 * 2**20
    assert "--no-deps --target" in done.stdout and "benchmarks/gpu.py --out" in done.stdout
    # The first printed command, as the GPU machine runs it: beside what is installed, nothing replaced.
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
               *map(str, bundle.glob("*.whl"))]
    assert subprocess.run(install, capture_output=True, timeout=300).returncode == 0
    assert {p.name for p in site.iterdir()} >= {"jsonargparse", "docstring_parser", "typeshed_client", "nanogpt_pl"}
    assert not (site / "torch").exists()
