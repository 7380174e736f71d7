"""Jobs and VMs to and from Redis hash fields (flat strings), and the queue's order."""

from __future__ import annotations

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


def _decode(cls: type[Job] | type[Vm], raw: dict[str, str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in _SKIP or f.name not in raw:
            continue
        text = raw[f.name]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if f.name in _ENUMS:
            enum = _ENUMS[f.name]
            try:
                kwargs[f.name] = enum(text)
            except ValueError:
                kwargs[f.name] = AgentState.NONE if enum is AgentState else next(iter(enum))
        elif kind.startswith("tuple"):
            kwargs[f.name] = tuple(s for s in text.split(",") if s)
        elif kind == "bool":
            kwargs[f.name] = text == "1"
        elif kind == "float":
            kwargs[f.name] = float(text or 0)
        elif kind == "int":
            kwargs[f.name] = int(float(text or 0))
        else:
            kwargs[f.name] = text
    return kwargs


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
