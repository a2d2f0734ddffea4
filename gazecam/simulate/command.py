"""``gazecam simulate-neon``: the command's flags map onto ``SimulatorSettings``.

Importing this module stays cheap (no aiohttp, no GStreamer): the command line imports it for
every command.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field
from pydantic_settings import CliPositionalArg

from gazecam.errors import ConfigError
from gazecam.sources import check_address

if TYPE_CHECKING:
    from gazecam.simulate.neon_simulator import NeonSimulator


class SimulateNeonCommand(BaseModel):
    """Play a recording as a Neon Companion device: HTTP API, RTSP streams, Time Echo, mDNS."""

    recording: CliPositionalArg[str] = Field(
        description="A Neon recording or Pupil Cloud export folder, or synthetic:NAME."
    )
    host: str | None = Field(
        None, description="Address to listen on [GAZECAM_SIM_HOST, 127.0.0.1]."
    )
    port: int | None = Field(None, description="HTTP API port [GAZECAM_SIM_PORT, 8080].")
    loop: bool | None = Field(None, description="Play the recording again and again [off].")
    rate: float | None = Field(None, description="Playback speed [GAZECAM_SIM_RATE, 1.0].")
    mdns: bool | None = Field(None, description="Announce the device by mDNS [on].")
    reencode: bool | None = Field(
        None,
        description="Decode and re-encode the scene video even where the recording's H.264 "
        "could be sent as it is [GAZECAM_SIM_REENCODE, off].",
    )
    fault: list[str] | None = Field(
        None,
        description="Inject a fault, KIND@AT[:SECONDS] (repeatable): drop@5, stall-video@5:3, "
        "stall-gaze@5:3, jump@5:0.5, away@5:4, late-gaze@5:0.05, reorder-gaze@5:0.05.",
    )

    def cli_cmd(self) -> None:
        """Serve until the recording ends (never with --loop) or a stop signal comes."""
        from gazecam.cli import _overrides, _show_warnings
        from gazecam.simulate.neon_simulator import NeonSimulator, SimulatorSettings

        if self.recording.startswith("neon://"):
            raise ConfigError(f"{self.recording}: simulate-neon plays a recording, not glasses")
        check_address(self.recording)
        _show_warnings()
        settings = SimulatorSettings(
            **_overrides(
                sim_host=self.host,
                sim_port=self.port,
                sim_loop=self.loop,
                sim_rate=self.rate,
                sim_mdns=self.mdns,
                sim_reencode=self.reencode,
                sim_faults=self.fault,
            )
        )
        asyncio.run(_serve_until_stopped(NeonSimulator(self.recording, settings)))


async def _serve_until_stopped(simulator: NeonSimulator) -> None:
    """Serve; SIGINT and SIGTERM end the command normally (exit code 0)."""
    from gazecam.simulate.neon_simulator import serve_forever

    serving = asyncio.create_task(serve_forever(simulator))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, serving.cancel)
    try:
        await serving
    except asyncio.CancelledError:
        if not serving.cancelled():
            raise  # cancelled from outside, not by a stop signal
