"""``gazecam serve``: the command's flags map onto ``ServerSettings``.

Importing this module stays cheap (no FastAPI, no uvicorn): the command line imports it for
every command, and the service is imported only when it runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from gazecam.errors import ConfigError
from gazecam.llm.settings import (
    ENGINE_HELP,
    REMOTE_MODEL_HELP,
    REMOTE_URL_HELP,
    VLM_HELP,
    EngineName,
    engine_settings,
)
from gazecam.server.settings import ServerSettings
from gazecam.settings import settings_problem


class ServeCommand(BaseModel):
    """Serve the stop-and-ask assistant: websocket asks, live state, and a web client at /."""

    source: str | None = Field(
        None,
        description="A Neon recording or Pupil Cloud export folder, neon://auto, "
        "neon://HOST[:PORT], or synthetic:NAME; replays loop in real time "
        "[GAZECAM_SOURCE, synthetic:demo].",
    )
    task: str | None = Field(
        None, description="Task card: a YAML file, or 'demo' (bundled) [GAZECAM_TASK, demo]."
    )
    host: str | None = Field(
        None,
        description="Address to listen on; other than loopback needs GAZECAM_TOKEN "
        "[GAZECAM_HOST, 127.0.0.1].",
    )
    port: int | None = Field(None, description="TCP port [GAZECAM_PORT, 8000].")
    engine: EngineName | None = Field(
        None,
        description=f"{ENGINE_HELP} A vlm engine that cannot load falls back to text, with a "
        "warning in /v1/status.",
    )
    vlm: Path | None = Field(None, description=VLM_HELP)
    remote_url: str | None = Field(None, description=REMOTE_URL_HELP)
    remote_model: str | None = Field(None, description=REMOTE_MODEL_HELP)

    def cli_cmd(self) -> None:
        """Run the service until interrupted."""
        from gazecam.server.app import serve

        flags: dict[str, Any] = {
            "source": self.source,
            "task": self.task,
            "host": self.host,
            "port": self.port,
        }
        # A flag left out keeps the setting from the environment or its default.
        try:
            settings = ServerSettings(
                **{key: value for key, value in flags.items() if value is not None}
            )
        except ValidationError as exc:
            # Every field of the command is a flag for the setting of its name.
            raise ConfigError(settings_problem(exc, {f: f for f in flags})) from exc
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
        serve(
            settings,
            *engine_settings(self.engine, self.vlm, self.remote_url, self.remote_model),
        )
