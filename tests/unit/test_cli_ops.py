"""The ops commands' parser and text rendering, without Redis."""

from __future__ import annotations

import pytest

from migctl.cli import build_parser
from migctl.cli_ops import explain_text, secs, table

COMMANDS = {
    "status": [],
    "vms": ["--state"],
    "jobs": ["--state", "--limit"],
    "explain": ["JOB"],
    "deadletters": ["--limit", "--with-data"],
    "dead-letters": ["--limit"],
    "drain": ["VM"],
    "cancel": ["JOB", "--reason"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_json_and_config(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([name, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--json", "--config PATH", "$MIGCTL_CONFIG", *COMMANDS[name]):
        assert option in text, (name, option)


def test_ids_are_required(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("explain", "drain", "cancel"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([name])
        assert exit_.value.code == 2
    assert "required" in capsys.readouterr().err


def test_the_old_commands_are_gone_from_cli_py() -> None:
    import migctl.cli

    assert not hasattr(migctl.cli, "cmd_status")
    assert not hasattr(migctl.cli, "cmd_deadletters")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        (0.04, "0.0s"),
        (12.345, "12.3s"),
        (61, "1m01s"),
        (3599, "59m59s"),
        (7200, "2.0h"),
    ],
)
def test_secs(value: float | None, text: str) -> None:
    assert secs(value) == text


def test_table_aligns_and_marks_empty_cells() -> None:
    assert table(("A", "LONGER"), [["x", ""], ["yyyy", None]]) == "A     LONGER\nx     -\nyyyy  -"


def test_explain_text() -> None:
    story = {
        "job": {
            "id": "77",
            "state": "QUEUED",
            "repo": "acme/api",
            "labels": ["self-hosted", "linux"],
            "retries": 1,
        },
        "timeline": [
            {"hop": "received", "at": 1700000000.0, "delta_s": None, "since_received_s": 0.0},
            {"hop": "queued", "at": 1700000000.25, "delta_s": 0.25, "since_received_s": 0.25},
        ],
        "decision": {"text": "deferred: max_vms (10) reached", "at": 1700000001.0},
        "reason": "VM runner-1 was lost",
        "vm_line": "",
        "no_vm_because": "no free VM whose labels cover self-hosted,linux",
        "waiting_for": "position 3 of 9 in the queue; max_vms (10) reached",
    }
    assert explain_text(story).splitlines() == [
        "job 77  QUEUED  acme/api  labels self-hosted,linux  retries 1",
        "",
        "HOP       AT (UTC)      DELTA  SINCE RECEIVED",
        "received  22:13:20.000  -      0.0s",
        "queued    22:13:20.250  +0.2s  0.2s",
        "",
        "last decision: deferred: max_vms (10) reached (at 22:13:21.000)",
        "reason:        VM runner-1 was lost",
        "VM:            none: no free VM whose labels cover self-hosted,linux",
        "waiting for:   position 3 of 9 in the queue; max_vms (10) reached",
    ]
