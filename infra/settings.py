"""Defaults you would otherwise type every day, from files: `[tool.mnist-cloud]` in the project's
pyproject.toml (or a mnist-cloud.toml beside it), and a user file, config.toml in mnist-cloud's config
directory (~/.config/mnist-cloud/ by default).

Each value comes from the first of: the flag, the environment, the project file, the user file, the
built-in default. `mnist-cloud config` shows every value and where it came from. A key that is not one
of SETTINGS, or a value of the wrong type, is one line naming the file and the key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.errors import UserError
from infra.state import config_dir


@dataclass(frozen=True)
class Setting:
    key: str
    type: type
    env: tuple[str, ...]  # environment variables, the first one set wins
    default: Any
    help: str


SETTINGS = {s.key: s for s in [
    # the AWS variables botocore itself reads, in its order; None: botocore's own (the profile's region)
    Setting("region", str, ("AWS_DEFAULT_REGION",), None, "AWS region (--region)"),
    Setting("profile", str, ("AWS_DEFAULT_PROFILE", "AWS_PROFILE"), None, "AWS profile from ~/.aws/config (--profile)"),
    Setting("instance", str, ("MNIST_CLOUD_DEFAULT_INSTANCE",), None, "instance type for launch (--instance)"),
    Setting("autostop", float, ("MNIST_CLOUD_DEFAULT_AUTOSTOP",), 30.0, "idle minutes before an instance stops "
            "itself (launch --autostop)"),
    Setting("model", str, ("MNIST_CLOUD_DEFAULT_MODEL",), None, "model for train and sweep (--model): a zoo name "
            "or path/to/file.py:Name"),
    Setting("epochs", int, ("MNIST_CLOUD_DEFAULT_EPOCHS",), None, "epochs for train and sweep (--epochs)"),
    Setting("budget", float, ("MNIST_CLOUD_DEFAULT_BUDGET",), None, "USD a new machine may cost from launch on, "
            "compute only: it stops itself there (launch --budget)"),
    Setting("notify", str, ("MNIST_CLOUD_NOTIFY",), None, "URLs the instance tells of a run's end, a spot "
            "interruption, autostop and the budget, comma-separated; slack:, discord:, ntfy: before a URL for those "
            "services (launch / train --on --notify)"),
    Setting("tensorboard", bool, ("MNIST_CLOUD_TENSORBOARD",), False, "write TensorBoard event files with each "
            "run, for train and sweep (--tensorboard; needs the tensorboard extra)"),
]}
PROJECT_FILES = ("mnist-cloud.toml", "pyproject.toml")


@dataclass(frozen=True)
class Value:
    value: Any
    source: str  # "flag", "environment ($X)", a file, or "default"


def project_file(start: Path | None = None) -> Path | None:
    """The nearest mnist-cloud.toml, or pyproject.toml with a [tool.mnist-cloud] table, from the
    current directory up to the filesystem root."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / PROJECT_FILES[0]).is_file():
            return d / PROJECT_FILES[0]
        if (d / PROJECT_FILES[1]).is_file() and _has_table(d / PROJECT_FILES[1]):
            return d / PROJECT_FILES[1]
    return None


def _has_table(pyproject: Path) -> bool:
    """Whether a pyproject.toml holds [tool.mnist-cloud]. One that does not parse (a template, say) is
    someone else's business, unless it names our table: then its error is ours to report."""
    try:
        return "mnist-cloud" in _read(pyproject).get("tool", {})
    except UserError:
        try:
            text = pyproject.read_text(errors="replace")
        except OSError:
            return False
        if "tool.mnist-cloud" in text:
            raise
        return False


def user_file() -> Path:
    return config_dir() / "config.toml"


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e}); fix it, or move it away") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _table(path: Path) -> dict[str, Any]:
    """The settings a file holds, checked: every key known, every value of its type."""
    data = _read(path)
    where = f"{path} [tool.mnist-cloud]" if path.name == "pyproject.toml" else str(path)
    table = data.get("tool", {}).get("mnist-cloud", {}) if path.name == "pyproject.toml" else data
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table of settings")
    for key, value in table.items():
        setting = SETTINGS.get(key)
        if setting is None:
            close = [k for k in SETTINGS if k.startswith(key[:3])] or list(SETTINGS)
            raise UserError(f"{where}: unknown key {key!r}; the keys are {', '.join(SETTINGS)}"
                            + (f" (did you mean {close[0]!r}?)" if len(close) == 1 else ""))
        ok = isinstance(value, bool) if setting.type is bool else (
            isinstance(value, setting.type) and not isinstance(value, bool)
            or setting.type is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise UserError(f"{where}: {key} must be {_kind(setting.type)}, got {value!r}")
    return table


def _kind(t: type) -> str:
    return {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}[t]


def _parse(setting: Setting, text: str) -> Any:
    if setting.type is not bool:
        return setting.type(text)
    if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return text.lower() in ("1", "true", "yes", "on")
    raise ValueError(text)


def _from_env(setting: Setting) -> Value | None:
    for name in setting.env:
        text = os.environ.get(name)
        if text:
            try:
                return Value(_parse(setting, text), f"environment (${name})")
            except ValueError:
                raise UserError(f"${name}={text!r}: {setting.key} must be {_kind(setting.type)}") from None
    return None


def resolve(flags: dict[str, Any] | None = None, start: Path | None = None) -> dict[str, Value]:
    """Every setting's value and its source. `flags`: what was typed (None values were not)."""
    flags = flags or {}
    files = [(p, _table(p)) for p in (project_file(start), user_file()) if p is not None and p.is_file()]
    out = {}
    for key, setting in SETTINGS.items():
        if flags.get(key) is not None:
            out[key] = Value(flags[key], "flag")
            continue
        found = _from_env(setting)
        for path, table in files:
            if found is None and key in table:
                found = Value(_relative_to(path, key, setting.type(table[key])), str(path))
        out[key] = found or Value(setting.default, "default")
    return out


def _relative_to(path: Path, key: str, value: Any) -> Any:
    """A model file named in a settings file is relative to that file, wherever the command runs."""
    target, sep, attr = str(value).rpartition(":")
    if key != "model" or not sep or not (target.endswith(".py") or "/" in target):
        return value
    return f"{(path.parent / Path(target).expanduser()).resolve()}:{attr}"


def value(key: str, flag: Any = None) -> Any:
    """One setting: the flag if given, else the environment, the files, the default."""
    return resolve({key: flag})[key].value
