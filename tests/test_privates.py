"""Lightning's and torch's private attributes are used under ``nanogpt_pl/run/`` only, where each
is listed with its reason (``nanogpt_pl/run/__init__.py``): a new one elsewhere fails here."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect

from conftest import REPO

PACKAGE = REPO / "nanogpt_pl"
FRAMEWORKS = ("lightning", "torch", "jsonargparse", "tensorboard", "torchmetrics")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _framework_privates(cls: type) -> set[str]:
    """The private names ``cls`` inherits from classes outside this package."""
    return {
        name for base in cls.__mro__ if not base.__module__.startswith("nanogpt_pl")
        for name in vars(base) if _private(name)
    }


def uses(path, module) -> list[str]:
    """Every use of a framework private in the source file ``path`` of the imported ``module``."""
    found = []
    where = lambda node: f"{path.name}:{node.lineno}"  # noqa: E731
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FRAMEWORKS:
            found += [f"{where(node)}: imports {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{where(node)}: {ast.unparse(node)}")
        elif isinstance(node, ast.ClassDef):
            cls = getattr(module, node.name, None)
            inherited = _framework_privates(cls) if inspect.isclass(cls) else set()
            for inner in ast.walk(node):
                name = inner.name if isinstance(inner, ast.FunctionDef) else (
                    inner.attr if isinstance(inner, ast.Attribute) else None)
                if name in inherited:
                    found.append(f"{where(inner)}: {node.name} touches the inherited {name}")
    return found


def test_framework_privates_live_under_run_only():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name != "run":
            module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
            found += uses(path, module)
    assert found == []


def test_the_check_sees_each_kind_of_use(tmp_path):
    # The rule itself, on a module that does all three: it must find every one.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype\n"
        "from lightning.pytorch.callbacks import ModelCheckpoint\n"
        "def f(trainer):\n    return trainer._signal_connector\n"
        "class C(ModelCheckpoint):\n    def _save_last_checkpoint(self, trainer, monitor):\n        pass\n"
    )
    spec = importlib.util.spec_from_file_location("probe", probe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(line.split(": ", 1)[1] for line in uses(probe, module)) == [
        "C touches the inherited _save_last_checkpoint", "imports _plugin_to_compute_dtype", "trainer._signal_connector",
    ]
