"""What every process entry point does first: `--config`, the settings, the logging."""

from __future__ import annotations

import argparse

from migctl.logs import setup_logging
from migctl.settings import ConfigError, Settings, load_settings


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="controller YAML (default: $MIGCTL_CONFIG)")


def start(config_path: str | None) -> Settings | None:
    """The settings with logging set up, or None after printing the config error (the
    caller exits 2: a person's mistake, no traceback)."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(exc)
        return None
    setup_logging(settings)
    return settings
