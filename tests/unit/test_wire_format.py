"""The MIGlet protocol on the wire: bytes built by hand from PROTOCOL.md's field numbers.

Deployed agents only care about tags on the wire (field_number << 3 | wire_type), so each
message is assembled here byte by byte, decoded with the generated classes, and the
classes' own encoding is compared with it.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from migctl.wire.miglet import commands_pb2 as pb
from migctl.wire.miglet import commands_pb2_grpc as pb_grpc

# --- a protobuf encoder small enough to check by eye ----------------------------------

VARINT, I64, LEN = 0, 1, 2


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def string(field: int, text: str) -> bytes:
    raw = text.encode()
    return tag(field, LEN) + varint(len(raw)) + raw


def message(field: int, body: bytes) -> bytes:
    return tag(field, LEN) + varint(len(body)) + body


def int64(field: int, n: int) -> bytes:
    return tag(field, VARINT) + varint(n)


def boolean(field: int, value: bool) -> bytes:
    return tag(field, VARINT) + varint(int(value))


def double(field: int, x: float) -> bytes:
    return tag(field, I64) + struct.pack("<d", x)


def string_map(field: int, entries: dict[str, str]) -> bytes:
    """A map is a repeated entry message {key = 1, value = 2}; sorted as deterministic=True."""
    return b"".join(message(field, string(1, k) + string(2, v)) for k, v in sorted(entries.items()))


def int_map(field: int, entries: dict[str, int]) -> bytes:
    return b"".join(message(field, string(1, k) + int64(2, v)) for k, v in sorted(entries.items()))


def bool_map(field: int, entries: dict[str, bool]) -> bytes:
    return b"".join(
        message(field, string(1, k) + boolean(2, v)) for k, v in sorted(entries.items())
    )


def test_the_hand_encoder_matches_the_protobuf_spec_examples() -> None:
    # protobuf.dev/programming-guides/encoding: 150 in field 1 is 08 96 01; 300 is ac 02.
    assert int64(1, 150) == bytes.fromhex("089601")
    assert varint(300) == bytes.fromhex("ac02")
    assert string(2, "testing") == bytes.fromhex("120774657374696e67")
    assert varint(-1) == b"\xff" * 9 + b"\x01"
    assert tag(1, LEN) == b"\x0a"
    assert tag(16, LEN) == b"\x82\x01"


def encode(msg: Any) -> bytes:
    return msg.SerializeToString(deterministic=True)


# --- MIGletMessage ---------------------------------------------------------------------

TS = 1_767_225_600  # 2026-01-01T00:00:00Z


def test_connect() -> None:
    wire = message(
        1,
        string(1, "runner-abcd")
        + string(2, "pool-2vcpu")
        + string(3, "org-1")
        + string(4, "1.4.2"),
    )
    decoded = pb.MIGletMessage.FromString(wire)
    assert decoded.WhichOneof("message") == "connect"
    c = decoded.connect
    assert (c.vm_id, c.pool_id, c.org_id, c.version) == (
        "runner-abcd",
        "pool-2vcpu",
        "org-1",
        "1.4.2",
    )
    built = pb.MIGletMessage(
        connect=pb.ConnectRequest(
            vm_id="runner-abcd", pool_id="pool-2vcpu", org_id="org-1", version="1.4.2"
        )
    )
    assert encode(built) == wire


def test_heartbeat() -> None:
    health = (
        double(1, 12.5)
        + double(2, 40.25)
        + double(3, 71.0)
        + int64(4, 8 << 30)
        + int64(5, 3 << 30)
        + int64(6, 100 << 30)
        + int64(7, 71 << 30)
    )
    runner = (
        string(1, "running")
        + boolean(2, True)
        + string(3, "runner-abcd")
        + string(4, "self-hosted")
        + string(4, "linux")
    )
    job = (
        string(1, "123456")
        + string(2, "987")
        + string(3, "acme/app")
        + string(4, "main")
        + string(5, "deadbeef")
        + string(6, "running")
        + int64(7, TS - 30)
    )
    wire = message(
        4,
        string(1, "runner-abcd")
        + string(2, "pool-2vcpu")
        + string(3, "org-1")
        + message(4, health)
        + message(5, runner)
        + message(6, job)
        + int64(7, TS)
        + string(8, "job_running"),
    )
    decoded = pb.MIGletMessage.FromString(wire)
    assert decoded.WhichOneof("message") == "heartbeat"
    hb = decoded.heartbeat
    assert (hb.vm_id, hb.pool_id, hb.org_id, hb.timestamp) == (
        "runner-abcd",
        "pool-2vcpu",
        "org-1",
        TS,
    )
    assert hb.miglet_state == "job_running"
    assert hb.health.cpu_usage_percent == 12.5
    assert hb.health.memory_usage_percent == 40.25
    assert hb.health.disk_usage_percent == 71.0
    assert hb.health.memory_total_bytes == 8 << 30
    assert hb.health.memory_used_bytes == 3 << 30
    assert hb.health.disk_total_bytes == 100 << 30
    assert hb.health.disk_used_bytes == 71 << 30
    assert hb.runner_state.state == "running"
    assert hb.runner_state.configured is True
    assert hb.runner_state.runner_name == "runner-abcd"
    assert list(hb.runner_state.labels) == ["self-hosted", "linux"]
    j = hb.current_job
    assert (j.job_id, j.run_id, j.repository, j.branch, j.commit, j.status, j.started_at) == (
        "123456",
        "987",
        "acme/app",
        "main",
        "deadbeef",
        "running",
        TS - 30,
    )
    built = pb.MIGletMessage(
        heartbeat=pb.Heartbeat(
            vm_id="runner-abcd",
            pool_id="pool-2vcpu",
            org_id="org-1",
            health=pb.VMHealth(
                cpu_usage_percent=12.5,
                memory_usage_percent=40.25,
                disk_usage_percent=71.0,
                memory_total_bytes=8 << 30,
                memory_used_bytes=3 << 30,
                disk_total_bytes=100 << 30,
                disk_used_bytes=71 << 30,
            ),
            runner_state=pb.RunnerState(
                state="running",
                configured=True,
                runner_name="runner-abcd",
                labels=["self-hosted", "linux"],
            ),
            current_job=pb.JobInfo(
                job_id="123456",
                run_id="987",
                repository="acme/app",
                branch="main",
                commit="deadbeef",
                status="running",
                started_at=TS - 30,
            ),
            timestamp=TS,
            miglet_state="job_running",
        )
    )
    assert encode(built) == wire


def test_event_with_data_map() -> None:
    data = {"job_id": "123456", "run_id": "987", "success": "true"}
    wire = message(
        3,
        string(1, "job_completed")
        + string(2, "runner-abcd")
        + string(3, "pool-2vcpu")
        + string(4, "org-1")
        + string_map(5, data)
        + int64(6, TS),
    )
    decoded = pb.MIGletMessage.FromString(wire)
    assert decoded.WhichOneof("message") == "event"
    ev = decoded.event
    assert (ev.type, ev.vm_id, ev.pool_id, ev.org_id, ev.timestamp) == (
        "job_completed",
        "runner-abcd",
        "pool-2vcpu",
        "org-1",
        TS,
    )
    assert dict(ev.data) == data
    built = pb.MIGletMessage(
        event=pb.EventNotification(
            type="job_completed",
            vm_id="runner-abcd",
            pool_id="pool-2vcpu",
            org_id="org-1",
            data=data,
            timestamp=TS,
        )
    )
    assert encode(built) == wire


def test_map_entries_decode_in_any_order() -> None:
    wire = message(3, string(1, "job_started") + message(5, string(1, "b") + string(2, "2")))
    wire += message(3, message(5, string(2, "1") + string(1, "a")))  # value before key
    ev = pb.MIGletMessage.FromString(wire).event  # a repeated sub-message field merges
    assert ev.type == "job_started"
    assert dict(ev.data) == {"a": "1", "b": "2"}


def test_command_ack_with_result_map() -> None:
    result = {"runner_name": "runner-abcd", "runner_id": "42"}
    wire = message(
        2, string(1, "cmd-7") + boolean(2, True) + string(3, "registered") + string_map(4, result)
    )
    decoded = pb.MIGletMessage.FromString(wire)
    assert decoded.WhichOneof("message") == "command_ack"
    ack = decoded.command_ack
    assert (ack.command_id, ack.success, ack.message) == ("cmd-7", True, "registered")
    assert dict(ack.result) == result
    built = pb.MIGletMessage(
        command_ack=pb.CommandAck(
            command_id="cmd-7", success=True, message="registered", result=result
        )
    )
    assert encode(built) == wire


def test_miglet_error() -> None:
    details = {"exit_code": "1"}
    wire = message(
        5,
        string(1, "RUNNER_CONFIG_FAILED")
        + string(2, "config.sh failed")
        + string_map(3, details)
        + int64(4, TS),
    )
    decoded = pb.MIGletMessage.FromString(wire)
    assert decoded.WhichOneof("message") == "error"
    err = decoded.error
    assert (err.code, err.message, dict(err.details), err.timestamp) == (
        "RUNNER_CONFIG_FAILED",
        "config.sh failed",
        details,
        TS,
    )
    built = pb.MIGletMessage(
        error=pb.ErrorNotification(
            code="RUNNER_CONFIG_FAILED", message="config.sh failed", details=details, timestamp=TS
        )
    )
    assert encode(built) == wire


# --- ControllerMessage -----------------------------------------------------------------


def test_connect_ack() -> None:
    wire = message(1, boolean(1, True) + string(2, "welcome") + string(3, "migctl 0.1.0"))
    decoded = pb.ControllerMessage.FromString(wire)
    assert decoded.WhichOneof("message") == "connect_ack"
    ack = decoded.connect_ack
    assert (ack.accepted, ack.message, ack.server_version) == (True, "welcome", "migctl 0.1.0")
    built = pb.ControllerMessage(
        connect_ack=pb.ConnectAck(accepted=True, message="welcome", server_version="migctl 0.1.0")
    )
    assert encode(built) == wire


def test_register_runner_command() -> None:
    strings = {
        "registration_token": "AABBCC",
        "runner_url": "https://github.com/acme",
        "runner_group": "default",
    }
    ints = {"timeout": 300, "delta": -1}
    bools = {"force": True, "ephemeral": False}
    labels = ["self-hosted", "linux", "x64"]
    wire = message(
        2,
        string(1, "cmd-7")
        + string(2, "register_runner")
        + string_map(3, strings)
        + int_map(4, ints)
        + bool_map(5, bools)
        + b"".join(string(6, label) for label in labels)
        + int64(7, TS),
    )
    decoded = pb.ControllerMessage.FromString(wire)
    assert decoded.WhichOneof("message") == "command"
    cmd = decoded.command
    assert (cmd.id, cmd.type, cmd.created_at) == ("cmd-7", "register_runner", TS)
    assert dict(cmd.string_params) == strings
    assert dict(cmd.int_params) == ints
    assert dict(cmd.bool_params) == bools
    assert list(cmd.string_array_params) == labels
    built = pb.ControllerMessage(
        command=pb.Command(
            id="cmd-7",
            type="register_runner",
            string_params=strings,
            int_params=ints,
            bool_params=bools,
            string_array_params=labels,
            created_at=TS,
        )
    )
    assert encode(built) == wire


def test_controller_error() -> None:
    wire = message(3, string(1, "REJECTED") + string(2, "unknown pool") + int64(4, TS))
    decoded = pb.ControllerMessage.FromString(wire)
    assert decoded.WhichOneof("message") == "error"
    assert (decoded.error.code, decoded.error.message, decoded.error.timestamp) == (
        "REJECTED",
        "unknown pool",
        TS,
    )
    built = pb.ControllerMessage(
        error=pb.ErrorNotification(code="REJECTED", message="unknown pool", timestamp=TS)
    )
    assert encode(built) == wire


# --- service, package, method path -----------------------------------------------------


def test_package_service_and_method() -> None:
    assert pb.DESCRIPTOR.package == "miglet.commands"
    service = pb.DESCRIPTOR.services_by_name["CommandService"]
    assert service.full_name == "miglet.commands.CommandService"
    method = service.methods_by_name["StreamCommands"]
    assert f"/{service.full_name}/{method.name}" == "/miglet.commands.CommandService/StreamCommands"
    assert method.input_type.full_name == "miglet.commands.MIGletMessage"
    assert method.output_type.full_name == "miglet.commands.ControllerMessage"
    assert method.client_streaming and method.server_streaming


class _RecordingChannel:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def stream_stream(self, path: str, **_: Any) -> object:
        self.calls.append(("stream_stream", path))
        return object()


class _RecordingServer:
    def __init__(self) -> None:
        self.services: list[str] = []
        self.methods: dict[str, list[str]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.services += [h.service_name() for h in handlers]

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.methods[service] = sorted(handlers)


def test_generated_stubs_use_the_full_method_path() -> None:
    channel = _RecordingChannel()
    pb_grpc.CommandServiceStub(channel)
    assert channel.calls == [("stream_stream", "/miglet.commands.CommandService/StreamCommands")]
    server = _RecordingServer()
    pb_grpc.add_CommandServiceServicer_to_server(pb_grpc.CommandServiceServicer(), server)
    assert server.services == ["miglet.commands.CommandService"]
    assert server.methods == {"miglet.commands.CommandService": ["StreamCommands"]}


# --- every field of PROTOCOL.md's table, against the descriptors ------------------------

# Copied from PROTOCOL.md ("Messages (field name = number, type)"): the contract.
PROTOCOL_TABLE = """
| MIGletMessage | oneof `message`: connect=1 ConnectRequest, command_ack=2 CommandAck, event=3 EventNotification, heartbeat=4 Heartbeat, error=5 ErrorNotification |
| ControllerMessage | oneof `message`: connect_ack=1 ConnectAck, command=2 Command, error=3 ErrorNotification |
| ConnectRequest | vm_id=1 string, pool_id=2 string, org_id=3 string, version=4 string |
| ConnectAck | accepted=1 bool, message=2 string, server_version=3 string |
| Command | id=1 string, type=2 string, string_params=3 map<string,string>, int_params=4 map<string,int64>, bool_params=5 map<string,bool>, string_array_params=6 repeated string, created_at=7 int64 (unix seconds) |
| CommandAck | command_id=1 string, success=2 bool, message=3 string, result=4 map<string,string> |
| EventNotification | type=1 string, vm_id=2 string, pool_id=3 string, org_id=4 string, data=5 map<string,string>, timestamp=6 int64 |
| Heartbeat | vm_id=1 string, pool_id=2 string, org_id=3 string, health=4 VMHealth, runner_state=5 RunnerState, current_job=6 JobInfo, timestamp=7 int64, miglet_state=8 string |
| VMHealth | cpu_usage_percent=1 double, memory_usage_percent=2 double, disk_usage_percent=3 double, memory_total_bytes=4 int64, memory_used_bytes=5 int64, disk_total_bytes=6 int64, disk_used_bytes=7 int64 |
| RunnerState | state=1 string (idle, running, offline), configured=2 bool, runner_name=3 string, labels=4 repeated string |
| JobInfo | job_id=1 string, run_id=2 string, repository=3 string, branch=4 string, commit=5 string, status=6 string (running, completed, failed), started_at=7 int64 |
| ErrorNotification | code=1 string, message=2 string, details=3 map<string,string>, timestamp=4 int64 |
"""  # noqa: E501

_SCALARS = {
    "string": FieldDescriptor.TYPE_STRING,
    "bool": FieldDescriptor.TYPE_BOOL,
    "int64": FieldDescriptor.TYPE_INT64,
    "double": FieldDescriptor.TYPE_DOUBLE,
}


def _rows() -> list[tuple[str, str, int, str, bool]]:
    """(message, field, number, type, in the oneof `message`) for every field of the table."""
    rows = []
    for line in PROTOCOL_TABLE.strip().splitlines():
        _, name, fields, _ = (cell.strip() for cell in line.split("|"))
        oneof = fields.startswith("oneof `message`:")
        fields = fields.removeprefix("oneof `message`:")
        for spec in re.sub(r"\([^)]*\)", "", fields).split(", "):
            match = re.fullmatch(r"(\w+)=(\d+) (.+)", spec.strip())
            assert match, spec
            rows.append((name, match[1], int(match[2]), match[3].strip(), oneof))
    return rows


ROWS = _rows()


def test_the_table_was_read_whole() -> None:
    assert len(ROWS) == 5 + 3 + 4 + 3 + 7 + 4 + 6 + 8 + 7 + 4 + 7 + 4
    assert len({r[0] for r in ROWS}) == 12


def _check_type(field: FieldDescriptor, type_: str) -> None:
    map_match = re.fullmatch(r"map<(\w+),(\w+)>", type_)
    if map_match:
        entry = field.message_type
        assert field.is_repeated and entry.GetOptions().map_entry
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        assert (key.number, value.number) == (1, 2)
        assert key.type == _SCALARS[map_match[1]]
        assert value.type == _SCALARS[map_match[2]]
    elif type_.startswith("repeated "):
        assert field.is_repeated
        assert field.type == _SCALARS[type_.removeprefix("repeated ")]
    elif type_ in _SCALARS:
        assert not field.is_repeated
        assert field.type == _SCALARS[type_]
    else:
        assert not field.is_repeated
        assert field.type == FieldDescriptor.TYPE_MESSAGE
        assert field.message_type.full_name == f"miglet.commands.{type_}"


@pytest.mark.parametrize(
    ("message_name", "field_name", "number", "type_", "in_oneof"),
    ROWS,
    ids=[f"{r[0]}.{r[1]}" for r in ROWS],
)
def test_field_matches_protocol(
    message_name: str, field_name: str, number: int, type_: str, in_oneof: bool
) -> None:
    descriptor = pb.DESCRIPTOR.message_types_by_name[message_name]
    assert descriptor.full_name == f"miglet.commands.{message_name}"
    field = descriptor.fields_by_name[field_name]
    assert field.number == number
    _check_type(field, type_)
    if in_oneof:
        assert field.containing_oneof is not None
        assert field.containing_oneof.name == "message"
    else:
        assert field.containing_oneof is None


@pytest.mark.parametrize("message_name", sorted({r[0] for r in ROWS}))
def test_no_other_field_reuses_a_protocol_number(message_name: str) -> None:
    """Fields migctl adds must take new numbers, never one the table assigns."""
    descriptor = pb.DESCRIPTOR.message_types_by_name[message_name]
    table = {r[2]: r[1] for r in ROWS if r[0] == message_name}
    for field in descriptor.fields:
        if field.number in table:
            assert field.name == table[field.number]
