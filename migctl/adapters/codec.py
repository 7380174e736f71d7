"""Jobs and VMs to and from Redis hash fields (flat strings), and the queue's order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from enum import Enum
from typing import Any

from migctl.domain.model import AgentState, InfraStatus, Job, JobState, Lifecycle, Vm

_SKIP = {"extra"}
_ENUMS: dict[str, type[Enum]] = {
    "state": JobState,
    "infra": InfraStatus,
    "agent": AgentState,
    "lifecycle": Lifecycle,
}
# Priority first, then arrival: epoch seconds stay far below 1e10 for centuries.
_PRIORITY_WEIGHT = 1e10


def queue_score(job: Job) -> float:
    return -job.priority * _PRIORITY_WEIGHT + job.received_at


def _encode_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def encode(record: Job | Vm) -> dict[str, str]:
    return {
        f.name: _encode_value(getattr(record, f.name))
        for f in fields(record)
        if f.name not in _SKIP
    }


def flat(mapping: dict[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in mapping.items():
        out += [k, v]
    return out


def _enum_parser(enum: type[Enum]) -> Callable[[str], Any]:
    fallback = AgentState.NONE if enum is AgentState else next(iter(enum))

    def parse(text: str) -> Any:
        try:
            return enum(text)
        except ValueError:
            return fallback

    return parse


def _parser(name: str, kind: str) -> Callable[[str], Any]:
    if name in _ENUMS:
        return _enum_parser(_ENUMS[name])
    if kind.startswith("tuple"):
        return lambda text: tuple(s for s in text.split(",") if s)
    if kind == "bool":
        return lambda text: text == "1"
    if kind == "float":
        return lambda text: float(text or 0)
    if kind == "int":
        return lambda text: int(float(text or 0))
    return str


# One parser per field, built once: decoding a thousand VMs is on every reconcile pass.
_PARSERS: dict[type, list[tuple[str, Callable[[str], Any]]]] = {
    cls: [
        (
            f.name,
            _parser(f.name, f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")),
        )
        for f in fields(cls)
        if f.name not in _SKIP
    ]
    for cls in (Job, Vm)
}


def _decode(cls: type[Job] | type[Vm], raw: dict[str, str]) -> dict[str, Any]:
    return {name: parse(raw[name]) for name, parse in _PARSERS[cls] if name in raw}


def pairs(raw: list[Any] | dict[Any, Any]) -> dict[str, str]:
    """HGETALL's reply (a dict, or a flat list from Lua) as str -> str."""
    items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    return {_s(k): _s(v) for k, v in items}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def decode_job(raw: dict[str, str]) -> tuple[Job, int]:
    return Job(**_decode(Job, raw)), int(raw.get("rev", "0") or 0)


def decode_vm(raw: dict[str, str]) -> tuple[Vm, int]:
    return Vm(**_decode(Vm, raw)), int(raw.get("rev", "0") or 0)
