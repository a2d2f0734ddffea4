"""What deploy/ installs agrees with the service's settings and command line."""

from __future__ import annotations

import configparser

from gazecam.server.settings import ServerSettings
from tests.conftest import REPO


def test_the_env_example_is_valid_server_settings() -> None:
    env = {}
    for line in (REPO / "deploy" / "gazecam.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key.removeprefix("GAZECAM_").lower()] = value
    settings = ServerSettings(**env)  # a public host is accepted only with the token set
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.source == "neon://auto" and settings.token is not None


def test_the_unit_runs_the_installed_serve_command() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "deploy" / "gazecam.service")
    assert unit["Service"]["ExecStart"] == "/opt/gazecam/.venv/bin/gazecam serve"
    assert unit["Service"]["EnvironmentFile"] == "/etc/gazecam/gazecam.env"
    assert unit["Service"]["Restart"] == "on-failure"
