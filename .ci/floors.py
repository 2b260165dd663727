"""Print pyproject.toml's dependencies with each floor pinned exactly (torch left out: one CPU
wheel installs here), for the lowest-versions environment of .ci/run."""

import re
import tomllib
from pathlib import Path

spec = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
for dependency in spec["project"]["dependencies"]:
    name, floor = re.match(r"([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([0-9][^,\s]*)", dependency).groups()
    if name != "torch":
        print(f"{name}=={floor}")
