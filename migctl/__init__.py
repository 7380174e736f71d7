"""migctl: GitHub Actions runners on Google Cloud MIGs, on Celery and Redis.

`celery -A migctl worker|beat|flower` finds the Celery app as `migctl.app`. It is built
lazily, on first access, so importing any migctl module reads no config and opens no
connection.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from migctl.worker.app import get_app

        return get_app()
    raise AttributeError(name)
