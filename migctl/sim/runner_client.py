"""What a simulated VM's runner binary does with the fake GitHub: register, take a job, finish.

A blocking client of FakeGitHub's `/_sim/runners` routes, used by the simulated MIGlet agent.
Errors are migctl's: `NotFound` (runner gone), `PermanentError` (bad token or request),
`TemporaryError` (fake unreachable or failing).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import requests

from migctl.domain.errors import NotFound, PermanentError, TemporaryError

TIMEOUT = 10.0  # seconds, on top of a long-poll's own wait


class SimRunnerClient:
    """Thread-safe: one `requests.Session` per calling thread (a long-poll blocks its own)."""

    def __init__(self, base_url: str) -> None:
        self._base = base_url.rstrip("/")
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def register(
        self, url: str, name: str, labels: Sequence[str], token: str = "", jit_config: str = ""
    ) -> int:
        """Register a runner (config.sh --replace, or run.sh --jitconfig); returns its id."""
        body: dict[str, Any] = {"url": url, "name": name, "labels": list(labels), "ephemeral": True}
        if jit_config:
            body["jit_config"] = jit_config
        else:
            body["token"] = token
        resp = self._call("POST", "/_sim/runners", json=body)
        return int(resp.json()["id"])

    def next_job(self, runner_id: int, wait: float) -> dict[str, Any] | None:
        """The job GitHub hands this runner, or None if none came within `wait` seconds."""
        resp = self._call(
            "GET", f"/_sim/runners/{runner_id}/job", params={"wait": wait}, timeout=wait + TIMEOUT
        )
        if resp.status_code == 204:
            return None
        job: dict[str, Any] = resp.json()
        return job

    def complete(self, runner_id: int, job_id: str, conclusion: str) -> None:
        body = {"job_id": job_id, "conclusion": conclusion}
        self._call("POST", f"/_sim/runners/{runner_id}/complete", json=body)

    def renew(self, runner_id: int, job_id: str) -> None:
        """Renew the job's lock; NotFound once GitHub has taken the job away (runner lost)."""
        self._call("POST", f"/_sim/runners/{runner_id}/renew", json={"job_id": job_id})

    def remove(self, runner_id: int) -> None:
        """Deregister (config.sh remove); a runner already gone is fine."""
        try:
            self._call("DELETE", f"/_sim/runners/{runner_id}")
        except NotFound:
            pass

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        return session

    def _call(
        self, method: str, path: str, timeout: float = TIMEOUT, **kwargs: Any
    ) -> requests.Response:
        what = f"{method} {path}"
        try:
            resp = self._session().request(method, self._base + path, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            raise TemporaryError(f"fake GitHub {what}: {type(exc).__name__}") from exc
        if resp.ok:
            return resp
        try:
            message = str(resp.json().get("message", ""))
        except (ValueError, AttributeError):
            message = resp.reason or ""
        text = f"fake GitHub {what}: {resp.status_code} {message}".strip()
        if resp.status_code == 404:
            raise NotFound(text)
        if resp.status_code >= 500 or resp.status_code == 429:
            raise TemporaryError(text)
        raise PermanentError(text)
