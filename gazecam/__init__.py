"""gazecam: a real-time assistant for Pupil Labs Neon eye-tracking glasses."""

__version__ = "0.1.0"
