"""What arrives on the job subscription, validated and normalised into one `JobEvent`.

Two shapes: the Go controller's job message, and a raw GitHub `workflow_job` webhook
payload. `parse` never raises anything but `InvalidMessage`, whatever the bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from migctl.domain.errors import PermanentError

MiB = 1024 * 1024
Action = Literal["queued", "waiting", "in_progress", "completed"]
Source = Literal["job_message", "workflow_job"]
ACTIONS: tuple[str, ...] = get_args(Action)
_ID_MAX = 128  # ids become Redis key parts; GitHub's are 64-bit integers
_INT64 = 2**63


class InvalidMessage(PermanentError):
    """The message can never be processed; `reason` is one line saying why."""

    def __init__(self, reason: str) -> None:
        reason = " ".join(reason.splitlines())  # one line: it goes into logs and attributes
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class JobEvent:
    """One job event, whichever shape it came in."""

    action: Action
    job_id: str
    run_id: str
    labels: tuple[str, ...]
    org: str
    repo: str
    installation_id: int
    pool_id: str
    priority: int
    received_at: float
    runner_name: str
    conclusion: str
    source: Source


def _id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an integer or a string id, got {_show(value)}")
    if isinstance(value, int):
        if not 0 < value < _INT64:
            raise ValueError(f"expected a positive 64-bit id, got {_show(value)}")
        return str(value)
    text = value.strip()
    if not text or len(text) > _ID_MAX or not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError(
            f"expected a non-empty id without spaces (max {_ID_MAX}), got {_show(value)}"
        )
    return text


def _installation_id(value: Any) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 20:
        return int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _INT64:
        return value
    raise ValueError(f"expected a non-negative integer, got {_show(value)}")


def _epoch(value: Any) -> float | None:
    """RFC3339 text or unix seconds to epoch seconds; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e18 else math.inf
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            try:
                stamp = datetime.fromisoformat(value.strip())
            except ValueError:
                raise ValueError(
                    f"expected an RFC3339 time or unix seconds, got {_show(value)}"
                ) from None
            if stamp.tzinfo is None:  # RFC3339 requires an offset; read a bare one as UTC
                stamp = stamp.replace(tzinfo=UTC)
            seconds = stamp.timestamp()
    else:
        raise ValueError(f"expected an RFC3339 time or unix seconds, got {_show(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a finite time after 1970, got {_show(value)}")
    return seconds


def _labels(value: Any) -> Any:
    if isinstance(value, list) and any(isinstance(v, str) and not v.strip() for v in value):
        raise ValueError("must not contain empty strings")
    return value


Id = Annotated[str, BeforeValidator(_id)]
InstallationId = Annotated[int, BeforeValidator(_installation_id)]
Epoch = Annotated[float | None, BeforeValidator(_epoch)]
Labels = Annotated[list[str], BeforeValidator(_labels), Field(max_length=100)]
OptStr = Annotated[str, BeforeValidator(lambda v: "" if v is None else v)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class JobMessage(_Model):
    """The Go controller's Pub/Sub job message (a queued job for one pool)."""

    job_id: Id
    run_id: Id
    labels: Annotated[Labels, Field(min_length=1)]
    org_id: Annotated[str, BeforeValidator(lambda v: "" if v in (None, "") else _id(v))] = ""
    org_name: OptStr = ""
    installation_id: InstallationId = 0
    repo_full_name: OptStr = ""
    pool_id: OptStr = ""
    priority: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] = 0
    received_at: Epoch = None


class _WorkflowJob(_Model):
    id: Id
    run_id: Id
    labels: Labels
    status: OptStr = ""
    conclusion: OptStr = ""
    runner_name: OptStr = ""
    runner_id: int | None = None


class _Repository(_Model):
    full_name: str


class _Organization(_Model):
    login: str


class _Installation(_Model):
    id: InstallationId


class WorkflowJobPayload(_Model):
    """A GitHub `workflow_job` webhook payload; `action` is the event, not `status`."""

    action: Action
    workflow_job: _WorkflowJob
    repository: _Repository
    organization: _Organization | None = None
    installation: _Installation | None = None


def parse(
    data: bytes,
    attributes: Mapping[str, str],
    expected_pool: str,
    now: float,
    max_bytes: int = MiB,
) -> JobEvent:
    """Validate one message body and normalise it; raises `InvalidMessage` only."""
    try:
        return _parse(data, attributes, expected_pool, now, max_bytes)
    except InvalidMessage:
        raise
    except Exception as exc:  # a bug here must not crash the bridge or loop the message
        raise InvalidMessage(f"unreadable message ({type(exc).__name__}: {exc})"[:300]) from exc


def _parse(
    data: bytes, attributes: Mapping[str, str], expected_pool: str, now: float, max_bytes: int
) -> JobEvent:
    if len(data) > max_bytes:
        size = f"{len(data)} bytes" + (f" ({_size(len(data))})" if len(data) >= 1024 else "")
        raise InvalidMessage(f"payload is {size}, over the {_size(max_bytes)} limit")
    body = _json_object(data)
    github_event = (_attribute(attributes, "x-github-event") or "").strip().lower()
    if github_event and github_event != "workflow_job":
        raise InvalidMessage(
            f"GitHub event {github_event!r} is not workflow_job; only workflow_job carries jobs"
        )
    event_type = (_attribute(attributes, "event_type") or "").strip().lower()
    if "workflow_job" in body or "workflow_job" in (github_event, event_type):
        result = _from_workflow_job(_validate(WorkflowJobPayload, body), now)
    else:
        result = _from_job_message(_validate(JobMessage, body), now)
    # A publisher may route by attribute instead of by body; both must name this pool.
    attribute_pool = (_attribute(attributes, "pool_id") or "").strip()
    _check_pool(result.pool_id, expected_pool)
    _check_pool(attribute_pool, expected_pool)
    if attribute_pool and not result.pool_id:
        result = replace(result, pool_id=attribute_pool)
    return result


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"not JSON: {exc.msg} at char {exc.pos}") from None
    except RecursionError:
        raise InvalidMessage("not JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit limit
        raise InvalidMessage(f"not JSON: {str(exc).split(':')[0][:120]}") from None
    if not isinstance(body, dict):
        raise InvalidMessage(f"not a JSON object: got {_json_type(body)}")
    return body


def _attribute(attributes: Mapping[str, str], name: str) -> str | None:
    # Pub/Sub attribute keys are case-sensitive; HTTP header names copied into them are not.
    for key, value in attributes.items():
        if str(key).lower() == name:
            return str(value)
    return None


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidMessage(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors as one line: `path: problem`, at most three of them."""
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ""
        for loc in err["loc"]:
            where += f"[{loc}]" if isinstance(loc, int) else (f".{loc}" if where else str(loc))
        msg = str(err["msg"]).removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        if err["type"] == "literal_error" and err["loc"][-1:] == ("action",):
            msg = f"expected one of {', '.join(ACTIONS)}, got {_show(err.get('input'))}"
        elif err["type"] == "too_short":
            msg = "must not be empty"
        elif err["type"] == "too_long":
            ctx = err.get("ctx") or {}
            msg = f"at most {ctx.get('max_length')} items, got {ctx.get('actual_length')}"
        elif err["type"] not in ("missing", "value_error"):
            msg += f", got {_show(err.get('input'))}"
        parts.append(f"{where or 'message'}: {msg}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def _from_job_message(msg: JobMessage, now: float) -> JobEvent:
    repo = msg.repo_full_name.strip()
    _check_repo(repo, "repo_full_name")
    return JobEvent(
        action="queued",
        job_id=msg.job_id,
        run_id=msg.run_id,
        labels=tuple(msg.labels),
        # org_name is the login runners register under; an org_id may be numeric.
        org=msg.org_name.strip() or repo.partition("/")[0] or msg.org_id,
        repo=repo,
        installation_id=msg.installation_id,
        pool_id=msg.pool_id.strip(),
        priority=msg.priority,
        # A publisher clock ahead of ours (or milliseconds by mistake) must not date a job
        # in the future: queue age and ordering are computed from this.
        received_at=now if msg.received_at is None else min(msg.received_at, now),
        runner_name="",
        conclusion="",
        source="job_message",
    )


def _from_workflow_job(payload: WorkflowJobPayload, now: float) -> JobEvent:
    job = payload.workflow_job
    repo = payload.repository.full_name.strip()
    _check_repo(repo, "repository.full_name", required=True)
    if payload.action in ("queued", "waiting") and not job.labels:
        raise InvalidMessage(
            f"workflow_job.labels: a {payload.action} job needs at least one label"
        )
    org = payload.organization.login.strip() if payload.organization else ""
    return JobEvent(
        action=payload.action,
        job_id=job.id,
        run_id=job.run_id,
        labels=tuple(job.labels),
        org=org or repo.partition("/")[0],
        repo=repo,
        installation_id=payload.installation.id if payload.installation else 0,
        pool_id="",
        priority=0,
        received_at=now,
        runner_name=job.runner_name,
        conclusion=job.conclusion,
        source="workflow_job",
    )


def _check_repo(repo: str, field: str, required: bool = False) -> None:
    if not repo and not required:
        return
    owner, slash, name = repo.partition("/")
    if not (owner and slash and name) or "/" in name or any(c.isspace() for c in repo):
        raise InvalidMessage(f"{field}: expected 'owner/name', got {_show(repo)}")


def _check_pool(pool_id: str, expected_pool: str) -> None:
    if pool_id and expected_pool and pool_id != expected_pool:
        raise InvalidMessage(f"pool_id {pool_id!r} is not this pool {expected_pool!r}")


def _size(n: int) -> str:
    if n >= MiB:
        return f"{n / MiB:.1f}".removesuffix(".0") + " MiB"
    if n >= 1024:
        return f"{n / 1024:.1f}".removesuffix(".0") + " KiB"
    return f"{n} bytes"


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
