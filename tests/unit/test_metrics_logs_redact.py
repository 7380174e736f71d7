"""The log filter of migctl/redact.py: secrets never reach a handler's output, and records
carry pool, job and VM ids where known. (Logs are the third leg of observability, next
to the metrics; the file name keeps it with them.)"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from migctl.redact import MASK, ContextFilter, bind, install, log_context, redact, unbind

GHS = "ghs_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
GHP = "ghp_" + "Z" * 36
PAT = "github_pat_" + "11ABCDEFG0" + "x" * 60
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiIxMjM0NSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
JIT = "eyJ" + "2ZXJzaW9uIjoxLCJydW5uZXIiOiJ4In0" * 3
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc\n-----END RSA PRIVATE KEY-----"
REG = "AABBCCDDEEFFGGHHIIJJKKLLMM01"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"installation token {GHS} minted", GHS),
        (f"using {GHP} for the API", GHP),
        (f"pat={PAT}", PAT),
        (f"JWT {JWT} sent", JWT),
        (f"jit config {JIT}", JIT),
        (f"key:\n{PEM}\nloaded", "MIIEowIBAAKCAQEA"),
        ("half a key -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg", "MIIEvQIBADANBg"),
        (f"register --url https://github.com/acme --token={REG} --name x", REG),
        (f"registration_token: {REG}", REG),
        (f'{{"registration_token": "{REG}", "runner_name": "x"}}', REG),
        (f"string_params={{'token': '{REG}'}}", REG),
        ("Authorization: Bearer abc.def-123456", "abc.def-123456"),
        ("redis://:hunter2pass@redis.internal:6379/0", "hunter2pass"),
        ("password=hunter2 host=x", "hunter2"),
        ("FLOWER_BASIC_AUTH=admin:s3cret", "admin:s3cret"),
        ("private_key=abcdef0123456789", "abcdef0123456789"),
    ],
)
def test_secrets_are_redacted(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert MASK in out or "[REDACTED PEM]" in out


@pytest.mark.parametrize(
    "text",
    [
        "job 1234 assigned to runner-2vcpu-ab12cd",
        "VM runner-2vcpu-ab12cd is UNHEALTHY: no heartbeat for 61s",
        "max_scale_up_per_minute reached; retrying next minute",
        "gateway listening on 0.0.0.0:50051 (gRPC, plaintext) and :8080 (HTTP)",
        "missing or wrong bearer token",
        "the token service is slow",
        "https://github.com/acme/web/actions/runs/77",
    ],
)
def test_ordinary_lines_are_left_alone(text: str) -> None:
    assert redact(text) == text


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s|%(pool_id)s|%(job_id)s|%(vm_id)s"))
    logger = logging.getLogger("migctl.test.redact")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    install("pool-2vcpu", logger)
    yield logger, stream
    logger.handlers[:] = []


def lines(stream: io.StringIO) -> list[list[str]]:
    return [line.split("|") for line in stream.getvalue().splitlines() if "|" in line]


def test_arguments_and_tracebacks_are_redacted(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.info("token for %s is %s", "runner-1", GHS)
    try:
        raise RuntimeError(f"GitHub refused {JWT}")
    except RuntimeError:
        logger.exception("minting failed with password=%s", "hunter2")
    text = stream.getvalue()
    assert GHS not in text and JWT not in text and "hunter2" not in text
    assert "RuntimeError: GitHub refused [REDACTED]" in text
    assert "token for runner-1 is [REDACTED]" in text


def test_ids_from_context_extra_and_the_message(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    with log_context(job_id="555", vm_id="runner-a-1"):
        logger.info("assigning")
        with log_context(vm_id="runner-b-2"):
            logger.info("moved")
    logger.info("claimed", extra={"job_id": "9", "vm_id": "runner-c-3"})
    logger.info("job 1234 waits for VM runner-2vcpu-ab12cd")
    logger.info("VM not free")
    assert lines(stream) == [
        ["assigning", "pool-2vcpu", "555", "runner-a-1"],
        ["moved", "pool-2vcpu", "555", "runner-b-2"],
        ["claimed", "pool-2vcpu", "9", "runner-c-3"],
        ["job 1234 waits for VM runner-2vcpu-ab12cd", "pool-2vcpu", "1234", "runner-2vcpu-ab12cd"],
        ["VM not free", "pool-2vcpu", "", ""],
    ]


def test_bind_and_unbind(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    token = bind(vm_id="runner-x-1")
    logger.info("during")
    unbind(token)
    logger.info("after")
    assert [(line[0], line[3]) for line in lines(stream)] == [
        ("during", "runner-x-1"),
        ("after", ""),
    ]


def test_context_is_per_thread(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    with log_context(job_id="1"):
        other = threading.Thread(target=lambda: logger.info("elsewhere"))
        other.start()
        other.join()
        logger.info("here")
    assert [(line[0], line[2]) for line in lines(stream)] == [("elsewhere", ""), ("here", "1")]


def test_install_is_idempotent_and_covers_every_handler() -> None:
    logger = logging.getLogger("migctl.test.redact2")
    logger.propagate = False
    streams = [io.StringIO(), io.StringIO()]
    logger.handlers[:] = [logging.StreamHandler(s) for s in streams]
    try:
        install("p", logger)
        install("p", logger)
        assert all(
            sum(isinstance(f, ContextFilter) for f in h.filters) == 1 for h in logger.handlers
        )
        logger.warning("leaked %s", GHP)
        assert all(GHP not in s.getvalue() and MASK in s.getvalue() for s in streams)
    finally:
        logger.handlers[:] = []


def test_a_json_formatter_sees_the_redacted_message() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token=%s", (REG,), None)
    ContextFilter("p").filter(record)
    assert json.dumps({"msg": record.getMessage()}) == json.dumps({"msg": f"token={MASK}"})
