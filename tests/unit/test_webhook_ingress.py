"""The webhook ingress without a network: the signature, every decision of `Ingress`, the
catch-up's choice of deliveries, and the configuration it needs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migctl.settings import ConfigError, Settings
from migctl.webhook.catchup import Delivery, to_redeliver, worth_retrying
from migctl.webhook.ingress import Answer, Ingress
from migctl.webhook.main import webhook_secret
from migctl.webhook.publishers import LocalPublisher, build_publisher
from migctl.webhook.signature import check, sign
from migctl.webhook.testing import MemoryLedger, MemoryPublisher

# GitHub's documented example (docs: validating-webhook-deliveries).
VECTOR_SECRET = b"It's a Secret to Everybody"
VECTOR_BODY = b"Hello, World!"
VECTOR = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

SECRET = b"s3cret"
BODY = json.dumps({"action": "queued", "workflow_job": {"id": 1}}).encode()
DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"


# -- the signature ----------------------------------------------------------------------------


def test_githubs_test_vector() -> None:
    assert sign(VECTOR_SECRET, VECTOR_BODY) == VECTOR
    assert check(VECTOR_SECRET, VECTOR_BODY, VECTOR) is None


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing_signature"),
        ("", "missing_signature"),
        (VECTOR.replace("sha256=", "sha1="), "bad_signature"),
        (VECTOR[:-1], "bad_signature"),  # 63 digits
        (VECTOR + "0", "bad_signature"),
        ("sha256=" + "zz" * 32, "bad_signature"),
        ("sha256=" + "é" * 64, "bad_signature"),
        (VECTOR[:-1] + "f", "bad_signature"),  # the right shape, the wrong digest
        (sign(b"another secret", VECTOR_BODY), "bad_signature"),
        (sign(VECTOR_SECRET, VECTOR_BODY + b"\n"), "bad_signature"),
    ],
)
def test_refused_signatures(header: str | None, reason: str) -> None:
    refusal = check(VECTOR_SECRET, VECTOR_BODY, header)
    assert refusal is not None and refusal[0] == reason and refusal[1]


@pytest.mark.parametrize("header", [VECTOR.upper().replace("SHA256=", "sha256="), f" {VECTOR} "])
def test_hex_case_and_surrounding_space_do_not_matter(header: str) -> None:
    assert check(VECTOR_SECRET, VECTOR_BODY, header) is None


@settings(max_examples=300)
@given(secret=st.binary(min_size=1), body=st.binary(), header=st.text() | st.none())
def test_only_the_true_signature_passes(secret: bytes, body: bytes, header: str | None) -> None:
    expected = sign(secret, body)
    assert check(secret, body, expected) is None
    result = check(secret, body, header)
    assert (result is None) == (header is not None and header.strip().lower() == expected)


# -- the ingress ------------------------------------------------------------------------------


def headers(
    body: bytes = BODY, event: str | None = "workflow_job", delivery: str | None = DELIVERY
) -> dict[str, str]:
    out = {"x-hub-signature-256": sign(SECRET, body), "content-type": "application/json"}
    if event is not None:
        out["x-github-event"] = event
    if delivery is not None:
        out["x-github-delivery"] = delivery
    return out


@pytest.fixture
def publisher() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture
def ledger() -> MemoryLedger:
    return MemoryLedger()


@pytest.fixture
def ingress(publisher: MemoryPublisher, ledger: MemoryLedger) -> Ingress:
    return Ingress(SECRET, publisher, ledger)


def test_a_job_delivery_is_published_with_its_event_and_id(
    ingress: Ingress, publisher: MemoryPublisher, ledger: MemoryLedger
) -> None:
    answer = ingress.receive(headers(), BODY)
    assert (answer.status, answer.outcome) == (202, "accepted")
    assert publisher.messages == [
        (BODY, {"X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": DELIVERY})
    ]
    assert ledger.delivered == {DELIVERY}
    assert ledger.counts == {"received": 1, "accepted": 1}


@pytest.mark.parametrize(
    ("hdrs", "status", "outcome", "reason"),
    [
        ({**headers(), "x-hub-signature-256": ""}, 401, "refused", "missing_signature"),
        ({**headers(), "x-hub-signature-256": sign(b"x", BODY)}, 401, "refused", "bad_signature"),
        (headers(event="push"), 202, "ignored", ""),
        (headers(event="ping"), 202, "ignored", ""),
        (headers(event=None), 400, "refused", "missing_event"),
        (headers(delivery=None), 400, "refused", "bad_delivery"),
        (headers(delivery="../../etc"), 400, "refused", "bad_delivery"),
        (headers(delivery="a b"), 400, "refused", "bad_delivery"),
        (headers(delivery="x" * 65), 400, "refused", "bad_delivery"),
        (
            {**headers(), "content-type": "application/x-www-form-urlencoded"},
            415,
            "refused",
            "unsupported_media_type",
        ),
    ],
    ids=[
        "no-signature",
        "wrong-secret",
        "push",
        "ping",
        "no-event",
        "no-delivery-id",
        "path-in-delivery-id",
        "space-in-delivery-id",
        "long-delivery-id",
        "form-encoded",
    ],
)
def test_deliveries_that_are_not_published(
    ingress: Ingress,
    publisher: MemoryPublisher,
    ledger: MemoryLedger,
    hdrs: dict[str, str],
    status: int,
    outcome: str,
    reason: str,
) -> None:
    answer = ingress.receive(hdrs, BODY)
    assert (answer.status, answer.outcome, answer.reason) == (status, outcome, reason)
    assert answer.detail
    assert publisher.messages == [] and ledger.delivered == set()
    assert ledger.counts == {"received": 1, answer.counter: 1}


def test_a_json_content_type_with_parameters_is_json(
    ingress: Ingress, publisher: MemoryPublisher
) -> None:
    hdrs = {**headers(), "content-type": "application/json; charset=utf-8"}
    assert ingress.receive(hdrs, BODY).outcome == "accepted"
    hdrs = {k: v for k, v in headers().items() if k != "content-type"}
    assert ingress.receive({**hdrs, "x-github-delivery": "other"}, BODY).outcome == "accepted"
    assert len(publisher.messages) == 2


def test_a_redelivered_id_is_published_once(
    ingress: Ingress, publisher: MemoryPublisher, ledger: MemoryLedger
) -> None:
    first = ingress.receive(headers(), BODY)
    second = ingress.receive(headers(), BODY)
    other = ingress.receive(headers(delivery="another-guid"), BODY)
    assert [a.outcome for a in (first, second, other)] == ["accepted", "duplicate", "accepted"]
    assert second.status == 202
    assert len(publisher.messages) == 2
    assert ledger.counts == {"received": 3, "accepted": 2, "duplicates": 1}


def test_a_failed_publish_is_503_and_not_remembered(
    ingress: Ingress, publisher: MemoryPublisher, ledger: MemoryLedger
) -> None:
    publisher.fail(1)
    answer = ingress.receive(headers(), BODY)
    assert (answer.status, answer.reason) == (503, "publish_failed")
    assert ledger.delivered == set()
    retried = ingress.receive(headers(), BODY)  # GitHub's redelivery of the same id
    assert (retried.status, retried.outcome) == (202, "accepted")
    assert len(publisher.messages) == 1
    assert ledger.counts == {"received": 2, "refused:publish_failed": 1, "accepted": 1}


def test_a_body_the_topic_cannot_carry_is_413(ledger: MemoryLedger) -> None:
    publisher = MemoryPublisher(max_bytes=len(BODY) - 1)
    answer = Ingress(SECRET, publisher, ledger).receive(headers(), BODY)
    assert (answer.status, answer.reason) == (413, "too_large")
    assert publisher.messages == []


def test_the_dedupe_store_down_does_not_stop_deliveries(
    ingress: Ingress, publisher: MemoryPublisher, ledger: MemoryLedger
) -> None:
    ledger.down = True
    assert ingress.receive(headers(), BODY).outcome == "accepted"
    assert ingress.receive(headers(), BODY).outcome == "accepted"  # no dedupe: fails open
    assert len(publisher.messages) == 2
    ledger.down = False
    assert ledger.counts == {} and ledger.delivered == set()


def test_answer_bodies_and_counters() -> None:
    assert Answer(202, "accepted", detail="published as 7").body() == {
        "outcome": "accepted",
        "detail": "published as 7",
    }
    refused = Answer(401, "refused", "bad_signature", "no match")
    assert refused.body() == {"outcome": "refused", "reason": "bad_signature", "detail": "no match"}
    assert refused.counter == "refused:bad_signature"
    assert Answer(202, "duplicate").counter == "duplicates"


def test_an_empty_secret_is_refused(publisher: MemoryPublisher, ledger: MemoryLedger) -> None:
    with pytest.raises(ValueError, match="secret"):
        Ingress(b"", publisher, ledger)


# -- the catch-up's choice ----------------------------------------------------------------------

NOW = 1_800_000_000.0
SINCE = NOW - 3600


def attempt(
    id: int,
    guid: str,
    status: int,
    ago: float = 60.0,
    event: str = "workflow_job",
    redelivery: bool = False,
) -> Delivery:
    return Delivery(id, guid, NOW - ago, status, event, redelivery)


@pytest.mark.parametrize(
    ("attempts", "chosen"),
    [
        ([attempt(1, "a", 503)], [1]),
        ([attempt(1, "a", 0)], [1]),  # GitHub got no answer (we were down or slow)
        ([attempt(1, "a", 401)], [1]),  # the secret may have been fixed since
        ([attempt(1, "a", 202)], []),
        ([attempt(1, "a", 503), attempt(2, "a", 202, 30, redelivery=True)], []),
        ([attempt(1, "a", 503), attempt(2, "a", 503, 30, redelivery=True)], [2]),
        (
            [
                attempt(1, "a", 503, 90),
                attempt(2, "a", 503, 60, redelivery=True),
                attempt(3, "a", 503, 30, redelivery=True),
            ],
            [],  # three attempts: a person looks
        ),
        ([attempt(1, "a", 413)], []),  # it will never fit
        ([attempt(1, "a", 400)], []),
        ([attempt(1, "a", 503, event="push")], []),
        ([attempt(1, "a", 503, ago=7200)], []),  # before the window
        # The original is outside the window: its attempts cannot be counted.
        ([attempt(2, "a", 503, 30, redelivery=True)], []),
        ([attempt(2, "b", 500, 10), attempt(1, "a", 500, 20)], [1, 2]),  # oldest first
    ],
)
def test_to_redeliver(attempts: list[Delivery], chosen: list[int]) -> None:
    assert [d.id for d in to_redeliver(attempts, SINCE)] == chosen


@pytest.mark.parametrize(
    ("status", "retry"),
    [(0, True), (500, True), (503, True), (401, True), (404, True), (429, True), (400, False)],
)
def test_worth_retrying(status: int, retry: bool) -> None:
    assert worth_retrying(status) is retry


# -- configuration ------------------------------------------------------------------------------


def test_the_secret_comes_from_either_env_name() -> None:
    assert webhook_secret({"GITHUB_WEBHOOK_SECRET": "b"}) == b"b"
    assert webhook_secret({"MIGCTL_WEBHOOK_SECRET": "a", "GITHUB_WEBHOOK_SECRET": "b"}) == b"a"
    with pytest.raises(ConfigError) as err:
        webhook_secret({"MIGCTL_WEBHOOK_SECRET": ""})
    assert "MIGCTL_WEBHOOK_SECRET or GITHUB_WEBHOOK_SECRET" in str(err.value)


def _settings(**pubsub: Any) -> Settings:
    return Settings(
        pool={"id": "p1"},
        vm_manager={"provider": "sim"},
        github_app={"app_id": "1", "private_key": "x"},
        pubsub={"project_id": "proj", "subscription": "sub", **pubsub},
    )


def test_the_local_world_publishes_to_the_local_source() -> None:
    import redis

    client = redis.Redis()  # never connected here
    publisher = build_publisher(_settings(source="local"), client)
    assert isinstance(publisher, LocalPublisher) and publisher.pool_id == "p1"


def test_pubsub_needs_a_topic() -> None:
    import redis

    with pytest.raises(ConfigError) as err:
        build_publisher(_settings(), redis.Redis())
    assert "pubsub.topic" in str(err.value) and "CONTROLLER_PUBSUB_TOPIC" in str(err.value)
