"""Writes configs/controller.yaml.example from the settings tree, so the example cannot drift.

python -m migctl.config_example > configs/controller.yaml.example
"""

from __future__ import annotations

import json
import sys
import textwrap
import typing
from typing import Any

from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from migctl.settings import REQUIREMENTS, Settings, env_hint, format_duration, parse_duration

HEADER = """\
# migctl controller configuration: the Go MIG Controller's controller.yaml layout.
#
# Generated from migctl/settings.py by `python -m migctl.config_example`; regenerate
# instead of editing the example. Copy it to configs/controller.yaml and fill in the
# required values, or set them by env: every key is also CONTROLLER_<SECTION>_<KEY>
# (CONTROLLER_VM_MANAGER_MAX_VMS), and the seed's names work too (GITHUB_APP_ID,
# REDIS_JOBS_HOST, PUBSUB_SUBSCRIPTION, ...). Env overrides this file.
# Durations: "250ms", "30s", "5m", "1h30m" or plain seconds.
# Load it with --config PATH or env MIGCTL_CONFIG=PATH.
"""

_WIDTH = 88


def _is_duration(field: FieldInfo) -> bool:
    return any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in field.metadata)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def _choices(field: FieldInfo) -> list[str]:
    for arg in (field.annotation, *typing.get_args(field.annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return [str(a) for a in typing.get_args(arg)]
    return []


def _comment(lines: list[str], text: str, indent: str) -> None:
    for line in textwrap.wrap(
        text, _WIDTH - len(indent) - 2, break_on_hyphens=False, break_long_words=False
    ):
        lines.append(f"{indent}# {line}")


def _leaf(lines: list[str], path: tuple[str, ...], field: FieldInfo, indent: str) -> None:
    notes = [field.description or ""]
    choices = _choices(field)
    if choices:
        notes.append("One of: " + ", ".join(choices) + ".")
    for req in REQUIREMENTS:
        if req.path == path:
            notes.append("Required." if req.when == "always" else f"Required when {req.when}.")
    if field.is_required():
        notes.append("Required.")
    if field.examples:
        notes.append("Example: " + ", ".join(_scalar(e) for e in field.examples) + ".")
    notes.append(f"Env: {env_hint(path)}.")
    _comment(lines, " ".join(n for n in notes if n), indent)

    default = field.get_default(call_default_factory=True)
    name = path[-1]
    if default is PydanticUndefined:
        lines.append(f'{indent}{name}: ""')
    elif _is_duration(field):
        lines.append(f"{indent}{name}: {_scalar(format_duration(default))}")
    elif isinstance(default, list):
        if not default:
            lines.append(f"{indent}{name}: []")
        else:
            lines.append(f"{indent}{name}:")
            lines.extend(f"{indent}  - {_scalar(item)}" for item in default)
    else:
        lines.append(f"{indent}{name}: {_scalar(default)}")


def _section(
    lines: list[str], model: type[BaseModel], prefix: tuple[str, ...], indent: str
) -> None:
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not prefix:
                lines.append("")
            doc = field.description or (ann.__doc__ or "").strip().split("\n")[0]
            _comment(lines, doc, indent)
            lines.append(f"{indent}{name}:")
            _section(lines, ann, path, indent + "  ")
        else:
            _leaf(lines, path, field, indent)


def render() -> str:
    """The example file's text."""
    lines = HEADER.rstrip("\n").split("\n")
    _section(lines, Settings, (), "")
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
