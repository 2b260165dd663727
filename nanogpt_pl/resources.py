"""Where the shipped configs and Tiny Shakespeare live, wherever the command runs.

An installed wheel carries them inside the package (``nanogpt_pl/configs``,
``nanogpt_pl/tinyshakespeare``, mapped there from the repository's top-level ``configs/`` and
``data/tinyshakespeare/`` at build time); a clone or an editable install has them only at the
repository root. This module is the one place that knows both.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import yaml

from nanogpt_pl.errors import UsageError

_PACKAGE = Path(str(files("nanogpt_pl")))
_REPOSITORY = _PACKAGE.parent


def _shipped(installed: str, in_repository: str) -> Path:
    inside = _PACKAGE / installed
    return inside if inside.exists() else _REPOSITORY / in_repository


def configs_dir() -> Path:
    """The folder of the lecture's configs (v1.yaml .. v7.yaml)."""
    return _shipped("configs", "configs")


def data_file() -> Path:
    """Tiny Shakespeare, the lecture's text: the default training data."""
    return _shipped("tinyshakespeare/input.txt", "data/tinyshakespeare/input.txt")


def shipped_configs() -> dict[str, Path]:
    """Each shipped config by name (``v7``), in order."""
    return {path.stem: path for path in sorted(configs_dir().glob("*.yaml"))}


# A bare name (``v7``, ``v7.yaml``), as opposed to a path or an inline YAML string.
_NAME = re.compile(r"[\w.-]+")


def resolve_config(value: str) -> str:
    """The file ``--config value`` means: a path that exists wins, else a shipped config's name.

    Anything else that is not a bare name (an inline YAML string) is passed on as given. The file
    is parsed here so that a syntax error names the file rather than jsonargparse's string.
    """
    path = Path(value)
    if not path.exists() and _NAME.fullmatch(value):
        available = shipped_configs()
        name = value[: -len(".yaml")] if value.endswith(".yaml") else value
        if name not in available:
            raise UsageError(
                f"--config {value}: no such file here, nor a shipped config; "
                f"choose a path or one of {', '.join(available)} (list them with `configs`)."
            )
        path = available[name]
    elif not path.exists():
        return value
    if path.is_dir():
        raise UsageError(f"--config {value} is a directory; name a YAML file, e.g. --config v7.yaml.")
    try:
        text = path.read_text(encoding="utf-8")
        settings = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or err
        raise UsageError(f"--config {path}{where} is not valid YAML ({reason}): fix the file.") from None
    except OSError as err:
        raise UsageError(f"--config {path} cannot be read ({err.strerror or err}).") from None
    if settings is not None and not isinstance(settings, dict):
        kind = "plain text" if isinstance(settings, str) else f"a YAML {type(settings).__name__}"
        raise UsageError(
            f"--config {path} is not a config: it holds {kind}, not settings "
            "(sections such as `model:` and `data:`; see --print_config)."
        )
    if not path.is_file():
        # A pipe (`--config <(...)`) can be read once, and that was here: pass on what it said.
        return text if text.strip() else "{}"
    return str(path)


def resolve_config_arguments(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config X`` / ``--config=X`` pointing at the file it means."""
    resolved, argv = [], list(argv)
    while argv:
        arg = argv.pop(0)
        if arg == "--config" and argv:
            resolved += [arg, resolve_config(argv.pop(0))]
        elif arg.startswith("--config="):
            resolved.append("--config=" + resolve_config(arg[len("--config="):]))
        else:
            resolved.append(arg)
    return resolved
