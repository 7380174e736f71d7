"""The official Pub/Sub emulator (Java) as a child process, and helpers to talk to it.

Clients are built on an explicit insecure channel instead of `PUBSUB_EMULATOR_HOST`, so
nothing here changes the caller's environment.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from types import TracebackType

import google.cloud.pubsub_v1 as pubsub_v1
import grpc
from google.api_core import exceptions as gexc
from google.pubsub_v1.services.publisher import PublisherClient as GapicPublisherClient
from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport
from google.pubsub_v1.types import PubsubMessage

# Where the image's `google-cloud-cli-pubsub-emulator` package puts it (FACTS B.2).
EMULATOR_PATH = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
READY_LINE = "Server started"


class EmulatorError(RuntimeError):
    """The emulator did not start; the message carries the tail of its log."""


def find_emulator() -> str | None:
    """The emulator's start script when it and `java` are both available, else None."""
    if shutil.which("java") is None:
        return None
    if os.access(EMULATOR_PATH, os.X_OK):
        return EMULATOR_PATH
    return shutil.which("cloud-pubsub-emulator")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Emulator:
    """One emulator process in its own process group; use as a context manager."""

    def __init__(self, path: str | None = None, port: int = 0, startup_timeout: float = 60.0):
        self.path = path or find_emulator()
        self.port = port or _free_port()
        self.startup_timeout = startup_timeout
        self.started_in = 0.0  # seconds from spawn to the ready line, for people
        self._proc: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self._log)[-lines:])

    def start(self) -> Emulator:
        if self.path is None:
            raise EmulatorError(
                "Pub/Sub emulator not found: install google-cloud-cli-pubsub-emulator and java"
            )
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            [self.path, "--host=127.0.0.1", f"--port={self.port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # own process group: stop() also kills the JVM child
        )
        threading.Thread(target=self._pump, name="pubsub-emulator-log", daemon=True).start()
        deadline = t0 + self.startup_timeout
        while not self._ready.wait(0.05):
            if self._proc.poll() is not None:
                raise EmulatorError(
                    f"Pub/Sub emulator exited with {self._proc.returncode} before it started:\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EmulatorError(
                    f"Pub/Sub emulator did not log {READY_LINE!r} within "
                    f"{self.startup_timeout:.0f} s:\n" + self.log_tail()
                )
        self.started_in = time.monotonic() - t0
        return self

    def _pump(self) -> None:
        # Drain the pipe continuously: a full pipe would block the JVM.
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._log.append(line.rstrip())
            if READY_LINE in line:
                self._ready.set()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_UNCAPPED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def subscriber_client(host: str) -> pubsub_v1.SubscriberClient:
    """A real SubscriberClient talking plaintext gRPC to the emulator at `host`."""
    # The client library lifts gRPC's 4 MB receive cap on the channels it builds itself;
    # an explicit channel must too, or a pull carrying a few large messages stalls.
    channel = grpc.insecure_channel(host, options=_UNCAPPED)
    transport = SubscriberGrpcTransport(channel=channel, host=host)
    return pubsub_v1.SubscriberClient(transport=transport)


def publisher_client(host: str) -> pubsub_v1.PublisherClient:
    """A real (batching) PublisherClient talking plaintext gRPC to the emulator at `host`."""
    transport = PublisherGrpcTransport(channel=grpc.insecure_channel(host), host=host)
    return pubsub_v1.PublisherClient(transport=transport)


def ensure_topic_and_subscription(
    host: str, project: str, topic: str, subscription: str, ack_deadline_s: int = 60
) -> tuple[str, str]:
    """Create the topic and subscription if missing; returns their full paths."""
    pub, sub = publisher_client(host), subscriber_client(host)
    try:
        topic_path = pub.topic_path(project, topic)
        sub_path = sub.subscription_path(project, subscription)
        try:
            pub.create_topic(name=topic_path)
        except gexc.AlreadyExists:
            pass
        try:
            sub.create_subscription(
                name=sub_path, topic=topic_path, ack_deadline_seconds=ack_deadline_s
            )
        except gexc.AlreadyExists:
            pass
        return topic_path, sub_path
    finally:
        pub.transport.close()
        sub.transport.close()


def publish(
    host: str, project: str, topic: str, data: bytes, attributes: Mapping[str, str] | None = None
) -> str:
    """Publish one message synchronously (no batching); returns its message id."""
    # The plain GAPIC client, not the batching wrapper: one RPC, the id comes straight back.
    channel = grpc.insecure_channel(host)
    pub = GapicPublisherClient(transport=PublisherGrpcTransport(channel=channel, host=host))
    try:
        response = pub.publish(
            topic=pub.topic_path(project, topic),
            messages=[PubsubMessage(data=data, attributes=dict(attributes or {}))],
            timeout=30.0,
        )
        return str(response.message_ids[0])
    finally:
        channel.close()
