"""benchmarks/gpu.py cannot rot between GPU runs: its --smoke mode runs every part on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    assert {"v2", "v6", "v7"} <= set(json.loads((tmp_path / "reproduction" / "results.json").read_text()))
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
