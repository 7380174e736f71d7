"""`migctl.bridge.messages.parse`: every accepted shape, every refusal with its reason, fuzzing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migctl.bridge import messages
from migctl.bridge.messages import InvalidMessage, JobEvent, MiB, parse
from migctl.domain.errors import PermanentError

POOL = "pool-2"
NOW = 1_900_000_000.0  # after every time in these messages


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def job_message(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "org_id": "acme",
        "org_name": "acme",
        "installation_id": 4242,
        "repo_full_name": "acme/api",
        "run_id": 9001,
        "job_id": 123456789,
        "labels": ["self-hosted", "linux", "x64"],
        "pool_id": POOL,
        "priority": 5,
        "received_at": "2027-01-15T10:00:00Z",
    }
    body.update(over)
    return {k: v for k, v in body.items() if v is not ...}


def workflow_job(action: str, **job_over: Any) -> dict[str, Any]:
    """A `workflow_job` delivery with every key the webhook schema marks required."""
    job: dict[str, Any] = {
        "id": 29679449,
        "run_id": 2832853555,
        "run_attempt": 1,
        "run_url": "https://api.github.com/repos/acme/api/actions/runs/2832853555",
        "head_sha": "f5b9b2a7ac7b7d6d1ffe5b06a6c7b7b1e7f6f6a1",
        "head_branch": "main",
        "node_id": "CR_kwDOABCD",
        "name": "build",
        "workflow_name": "CI",
        "html_url": "https://github.com/acme/api/runs/29679449",
        "url": "https://api.github.com/repos/acme/api/actions/jobs/29679449",
        "check_run_url": "https://api.github.com/repos/acme/api/check-runs/29679449",
        "status": action,
        "conclusion": None,
        "labels": ["self-hosted", "linux"],
        "runner_id": None,
        "runner_name": None,
        "runner_group_id": None,
        "runner_group_name": None,
        "created_at": "2027-01-15T10:00:00Z",
        "started_at": "2027-01-15T10:00:00Z",
        "completed_at": None,
        "steps": [],
    }
    job.update(job_over)
    return {
        "action": action,
        "workflow_job": job,
        "repository": {"id": 1, "full_name": "acme/api", "owner": {"login": "acme"}},
        "organization": {"login": "acme", "id": 7},
        "installation": {"id": 4242, "node_id": "MDIzOkludGVncmF0aW9u"},
        "sender": {"login": "octocat"},
    }


def ok(body: Any, attributes: dict[str, str] | None = None, **kw: Any) -> JobEvent:
    data = body if isinstance(body, bytes) else encode(body)
    return parse(data, attributes or {}, kw.pop("expected_pool", POOL), NOW, **kw)


def refused(body: Any, attributes: dict[str, str] | None = None, **kw: Any) -> str:
    with pytest.raises(InvalidMessage) as info:
        ok(body, attributes, **kw)
    return info.value.reason


# ---------------------------------------------------------------- the Go job message


def test_job_message_full() -> None:
    assert ok(job_message()) == JobEvent(
        action="queued",
        job_id="123456789",
        run_id="9001",
        labels=("self-hosted", "linux", "x64"),
        org="acme",
        repo="acme/api",
        installation_id=4242,
        pool_id=POOL,
        priority=5,
        received_at=1800007200.0,  # 2027-01-15T10:00:00Z
        runner_name="",
        conclusion="",
        source="job_message",
    )


@pytest.mark.parametrize("value", [NOW + 3600, (NOW + 5) * 1000, "2099-01-01T00:00:00Z"])
def test_received_at_in_the_future_is_now(value: Any) -> None:
    assert ok(job_message(received_at=value)).received_at == NOW


def test_job_message_minimal_defaults() -> None:
    event = ok({"job_id": "j-1", "run_id": "r-1", "labels": ["linux"]})
    assert event.job_id == "j-1" and event.run_id == "r-1"
    assert (event.org, event.repo, event.installation_id, event.pool_id) == ("", "", 0, "")
    assert event.priority == 0
    assert event.received_at == NOW
    assert event.source == "job_message" and event.action == "queued"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2027-01-15T10:00:00Z", 1800007200.0),
        ("2027-01-15T12:00:00+02:00", 1800007200.0),
        ("2027-01-15T10:00:00.250Z", 1800007200.25),
        ("2027-01-15T10:00:00", 1800007200.0),  # no offset: read as UTC
        (1800007200, 1800007200.0),
        (1800007200.5, 1800007200.5),
        ("1800007200", 1800007200.0),
        (None, NOW),
        ("", NOW),
    ],
)
def test_received_at_forms(value: Any, expected: float) -> None:
    assert ok(job_message(received_at=value)).received_at == expected


@pytest.mark.parametrize(
    ("over", "field", "expected"),
    [
        ({"job_id": 7, "run_id": 8}, "job_id", "7"),
        ({"job_id": "  7  "}, "job_id", "7"),
        ({"installation_id": "4242"}, "installation_id", 4242),
        ({"installation_id": None}, "installation_id", 0),
        ({"installation_id": ...}, "installation_id", 0),
        ({"org_id": 12, "org_name": ...}, "org", "acme"),  # owner of repo_full_name
        ({"org_id": "acme-id", "org_name": ..., "repo_full_name": ...}, "org", "acme-id"),
        ({"org_name": "Acme-Inc"}, "org", "Acme-Inc"),
        ({"priority": ...}, "priority", 0),
        ({"priority": -3}, "priority", -3),
        ({"pool_id": ...}, "pool_id", ""),
        ({"pool_id": None}, "pool_id", ""),
        ({"unknown_field": {"nested": True}, "status": "queued"}, "job_id", "123456789"),
    ],
)
def test_job_message_normalisation(over: dict[str, Any], field: str, expected: Any) -> None:
    assert getattr(ok(job_message(**over)), field) == expected


def test_pool_id_may_come_as_an_attribute() -> None:
    assert ok(job_message(pool_id=...), {"pool_id": POOL}).pool_id == POOL


def test_no_expected_pool_accepts_any_pool() -> None:
    assert ok(job_message(pool_id="pool-9"), expected_pool="").pool_id == "pool-9"


# ---------------------------------------------------------------- the workflow_job webhook


@pytest.mark.parametrize("action", ["queued", "waiting", "in_progress", "completed"])
def test_workflow_job_each_action(action: str) -> None:
    over: dict[str, Any] = {}
    if action in ("in_progress", "completed"):
        over = {"runner_id": 11, "runner_name": "runner-abcd", "runner_group_id": 1}
    if action == "completed":
        over["conclusion"] = "success"
    event = ok(workflow_job(action, **over))
    assert event.action == action
    assert event.source == "workflow_job"
    assert (event.job_id, event.run_id) == ("29679449", "2832853555")
    assert event.labels == ("self-hosted", "linux")
    assert (event.org, event.repo, event.installation_id) == ("acme", "acme/api", 4242)
    assert event.received_at == NOW and event.pool_id == "" and event.priority == 0
    assert event.runner_name == ("runner-abcd" if over else "")
    assert event.conclusion == ("success" if action == "completed" else "")


def test_workflow_job_queued_with_status_waiting_keys_on_action() -> None:
    # The octokit example: action=queued while workflow_job.status is still "waiting".
    event = ok(workflow_job("queued", status="waiting"))
    assert event.action == "queued"


def test_workflow_job_in_progress_with_status_queued() -> None:
    assert ok(workflow_job("in_progress", status="queued")).action == "in_progress"


def test_workflow_job_without_organization_or_installation() -> None:
    body = workflow_job("queued")
    del body["organization"], body["installation"]
    event = ok(body)
    assert (event.org, event.installation_id) == ("acme", 0)


def test_workflow_job_completed_may_have_no_labels() -> None:
    assert ok(workflow_job("completed", labels=[], conclusion="cancelled")).labels == ()


@pytest.mark.parametrize(
    "attributes",
    [
        {"X-GitHub-Event": "workflow_job"},
        {"x-github-event": "workflow_job"},
        {"event_type": "workflow_job"},
    ],
)
def test_shape_chosen_by_attribute(attributes: dict[str, str]) -> None:
    # The attribute wins even when the body lacks the `workflow_job` key.
    assert refused({"action": "queued"}, attributes) == (
        "workflow_job: field required; repository: field required"
    )
    assert ok(workflow_job("queued"), attributes).source == "workflow_job"


def test_pool_attribute_applies_to_workflow_job() -> None:
    assert ok(workflow_job("queued"), {"pool_id": POOL}).pool_id == POOL
    assert refused(workflow_job("queued"), {"pool_id": "pool-4"}) == (
        "pool_id 'pool-4' is not this pool 'pool-2'"
    )


# ---------------------------------------------------------------- refusals and reasons


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not JSON: Expecting value at char 0"),
        (b"{", "not JSON: Expecting property name enclosed in double quotes at char 1"),
        (b"\xff\xfe", "not UTF-8: invalid start byte at byte 0"),
        (b"[1, 2]", "not a JSON object: got an array"),
        (b'"job"', "not a JSON object: got a string"),
        (b"42", "not a JSON object: got a number"),
        (b"null", "not a JSON object: got null"),
        (b"[" * 100_000, "not JSON: nested too deeply"),
        (
            b'{"job_id": ' + b"1" * 5000 + b"}",
            "not JSON: Exceeds the limit (4300 digits) for integer string conversion",
        ),
    ],
)
def test_unreadable_bodies(data: bytes, reason: str) -> None:
    assert refused(data) == reason


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"labels": ...}, "labels: field required"),
        ({"job_id": ...}, "job_id: field required"),
        (
            {"job_id": ..., "run_id": ..., "labels": ...},
            "job_id: field required; run_id: field required; labels: field required",
        ),
        ({"labels": []}, "labels: must not be empty"),
        ({"labels": "linux"}, "labels: input should be a valid list, got 'linux'"),
        ({"labels": ["linux", 5]}, "labels[1]: input should be a valid string, got 5"),
        ({"labels": ["linux", " "]}, "labels: must not contain empty strings"),
        (
            {"labels": ["x"] * 101},
            "labels: at most 100 items, got 101",
        ),
        ({"job_id": 1.5}, "job_id: expected an integer or a string id, got 1.5"),
        ({"job_id": 2**63}, "job_id: expected a positive 64-bit id, got 9223372036854775808"),
        (
            {"received_at": 10**400},
            "received_at: expected a finite time after 1970, got 1" + "0" * 36 + "...",
        ),
        ({"received_at": "NaN"}, "received_at: expected a finite time after 1970, got 'NaN'"),
        (
            {"installation_id": 2**63},
            "installation_id: expected a non-negative integer, got 9223372036854775808",
        ),
        ({"job_id": True}, "job_id: expected an integer or a string id, got True"),
        ({"job_id": 0}, "job_id: expected a positive 64-bit id, got 0"),
        ({"job_id": ""}, "job_id: expected a non-empty id without spaces (max 128), got ''"),
        ({"job_id": "a b"}, "job_id: expected a non-empty id without spaces (max 128), got 'a b'"),
        ({"run_id": None}, "run_id: expected an integer or a string id, got None"),
        ({"installation_id": -1}, "installation_id: expected a non-negative integer, got -1"),
        (
            {"installation_id": "inst"},
            "installation_id: expected a non-negative integer, got 'inst'",
        ),
        (
            {"priority": "high"},
            "priority: input should be a valid integer, unable to parse string as an integer, "
            "got 'high'",
        ),
        (
            {"received_at": "yesterday"},
            "received_at: expected an RFC3339 time or unix seconds, got 'yesterday'",
        ),
        ({"received_at": -5}, "received_at: expected a finite time after 1970, got -5"),
        ({"received_at": [1]}, "received_at: expected an RFC3339 time or unix seconds, got [1]"),
        ({"repo_full_name": "api"}, "repo_full_name: expected 'owner/name', got 'api'"),
        ({"repo_full_name": "a/b/c"}, "repo_full_name: expected 'owner/name', got 'a/b/c'"),
        ({"pool_id": "pool-4"}, "pool_id 'pool-4' is not this pool 'pool-2'"),
    ],
)
def test_job_message_refusals(over: dict[str, Any], reason: str) -> None:
    assert refused(job_message(**over)) == reason


def test_many_errors_are_summarised_on_one_line() -> None:
    reason = refused({"job_id": 1.5, "run_id": True, "labels": [], "priority": "x"})
    assert reason.endswith("(+1 more)") and "\n" not in reason
    assert reason.startswith("job_id: expected an integer or a string id, got 1.5; run_id:")


@pytest.mark.parametrize(
    ("body", "attributes", "reason"),
    [
        (
            {"action": "requested", "workflow_job": {}},
            {},
            "action: expected one of queued, waiting, in_progress, completed, got 'requested'; "
            "workflow_job.id: field required; workflow_job.run_id: field required (+2 more)",
        ),
        (
            workflow_job("queued", labels=[]),
            {},
            "workflow_job.labels: a queued job needs at least one label",
        ),
        (
            workflow_job("waiting", labels=[]),
            {},
            "workflow_job.labels: a waiting job needs at least one label",
        ),
        (
            workflow_job("queued", id=None),
            {},
            "workflow_job.id: expected an integer or a string id, got None",
        ),
        (
            {**workflow_job("queued"), "repository": {"full_name": "nope"}},
            {},
            "repository.full_name: expected 'owner/name', got 'nope'",
        ),
        (
            {**workflow_job("queued"), "installation": {"id": "x"}},
            {},
            "installation.id: expected a non-negative integer, got 'x'",
        ),
        (
            workflow_job("queued"),
            {"X-GitHub-Event": "ping"},
            "GitHub event 'ping' is not workflow_job; only workflow_job carries jobs",
        ),
        (
            job_message(),
            {"X-GitHub-Event": "push"},
            "GitHub event 'push' is not workflow_job; only workflow_job carries jobs",
        ),
        (
            job_message(pool_id=...),
            {"pool_id": "pool-4"},
            "pool_id 'pool-4' is not this pool 'pool-2'",
        ),
    ],
)
def test_workflow_job_and_attribute_refusals(
    body: Any, attributes: dict[str, str], reason: str
) -> None:
    assert refused(body, attributes) == reason


def test_size_limit() -> None:
    body = encode(job_message())
    padded = body[:-1] + b"," + b'"pad": "' + b"x" * (MiB - len(body) - 10) + b'"}'
    assert len(padded) == MiB
    assert ok(padded).job_id == "123456789"
    big = b" " * (2 * MiB + 100_000) + body
    assert refused(big) == f"payload is {len(big)} bytes (2.1 MiB), over the 1 MiB limit"
    assert refused(body, max_bytes=100) == f"payload is {len(body)} bytes, over the 100 bytes limit"


def test_invalid_message_is_permanent() -> None:
    err = InvalidMessage("a\nb")
    assert isinstance(err, PermanentError)
    assert err.reason == "a b" == str(err)


def test_a_bug_in_parsing_still_surfaces_as_invalid_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(data: bytes) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(messages, "_json_object", broken)
    assert refused(job_message()) == "unreadable message (KeyError: 'boom')"


# ---------------------------------------------------------------- fuzzing: only InvalidMessage

_FIELDS = [
    "job_id", "run_id", "labels", "org_id", "org_name", "installation_id", "repo_full_name",
    "pool_id", "priority", "received_at", "action", "workflow_job", "repository",
    "organization", "installation", "id", "login", "full_name", "status", "conclusion",
    "runner_name", "runner_id",
]  # fmt: skip
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["queued", "waiting", "in_progress", "completed", POOL, "pool-4", "a/b"])
    | st.sampled_from([2**63, 10**400, -(10**400), 1e308])
    | st.datetimes().map(lambda d: d.isoformat() + "Z")
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=5), inner, max_size=6)
    ),
    max_leaves=25,
)
_attributes = st.dictionaries(
    st.sampled_from(["X-GitHub-Event", "event_type", "pool_id"]) | st.text(max_size=8),
    st.sampled_from(["workflow_job", "ping", POOL, "pool-4", ""]) | st.text(max_size=8),
    max_size=3,
)


def _only_invalid_message(data: bytes, attributes: dict[str, str]) -> None:
    try:
        event = parse(data, attributes, POOL, NOW)
    except InvalidMessage as exc:
        assert exc.reason and "\n" not in exc.reason
        assert not exc.reason.startswith("unreadable message"), "a bug hid behind the catch-all"
        return
    assert event.job_id and event.run_id and isinstance(event.labels, tuple)
    assert event.pool_id in ("", POOL)
    assert event.action in ("queued", "waiting", "in_progress", "completed")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048), attributes=_attributes)
def test_fuzz_bytes(data: bytes, attributes: dict[str, str]) -> None:
    _only_invalid_message(data, attributes)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(body=_json, attributes=_attributes)
def test_fuzz_json(body: Any, attributes: dict[str, str]) -> None:
    _only_invalid_message(json.dumps(body).encode(), attributes)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(["job", "queued", "in_progress", "completed"]),
    changes=st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=3),
    job_changes=st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=3),
    drop=st.lists(st.sampled_from(_FIELDS), max_size=3),
    attributes=_attributes,
)
def test_fuzz_mutated_valid_messages(
    base: str,
    changes: dict[str, Any],
    job_changes: dict[str, Any],
    drop: list[str],
    attributes: dict[str, str],
) -> None:
    body = job_message() if base == "job" else workflow_job(base)
    body.update(changes)
    if isinstance(body.get("workflow_job"), dict):
        body["workflow_job"].update(job_changes)
    for key in drop:
        body.pop(key, None)
    _only_invalid_message(json.dumps(body).encode(), attributes)
