"""The exception hierarchy: everything gazecam raises on purpose derives from GazecamError.

Each message is one line that names the file, field or device and the problem, so the CLI
(and later the server) can show it to a person as it is.
"""

from __future__ import annotations


class GazecamError(Exception):
    """Root of all errors gazecam raises on purpose."""


class ConfigError(GazecamError):
    """A setting, flag or source address is invalid."""


class SourceError(GazecamError):
    """A source (recording folder, export, device) cannot be read or is inconsistent."""


class DeviceUnreachableError(SourceError):
    """A live device could not be found or connected to."""


class SimulatorError(GazecamError):
    """The Neon simulator cannot start or stopped serving (port in use, no GStreamer, ...)."""


class MissingDependencyError(GazecamError):
    """An optional package is needed for this feature and is not installed."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the package '{package}': install it with "
            f"pip install 'gazecam[{extra}]'"
        )


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (a library's may run to a page), or its
    type's name where it has none: for the one-line errors above."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
