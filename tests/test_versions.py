"""The declared versions are the tested ones: the environment running these tests satisfies
pyproject.toml, and the torch floor has every torch API the package calls."""

from __future__ import annotations

import importlib.metadata
import re
import sys

import pytest
import torch

from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def declared() -> dict[str, str]:
    spec = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0]: d for d in spec["project"]["dependencies"]}


def test_this_environment_is_inside_the_declared_ranges():
    from packaging.requirements import Requirement

    outside = []
    for name, requirement in declared().items():
        installed = importlib.metadata.version(name)
        if not Requirement(requirement).specifier.contains(installed.split("+")[0], prereleases=True):
            outside.append(f"{name} {installed} is outside {requirement}")
    assert outside == []


def test_the_torch_floor_has_every_torch_api_the_package_calls():
    # The newest of these sets the floor in pyproject.toml: torch.optim.Muon arrived in torch 2.9.
    model = torch.nn.Linear(4, 4)
    assert hasattr(torch.optim, "Muon") and hasattr(torch.nn, "RMSNorm")
    assert hasattr(torch.nn.functional, "rms_norm") and hasattr(torch.nn.functional, "scaled_dot_product_attention")
    torch.optim.AdamW(model.parameters(), fused=True).step()  # fused AdamW on the CPU
    assert re.match(r">=\s*2\.9\b", declared()["torch"].removeprefix("torch")), declared()["torch"]
