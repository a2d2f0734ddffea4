"""A Neon Companion simulator: plays a recording as the glasses' phone presents it live.

``gazecam simulate-neon RECORDING`` serves the Companion app's HTTP API, the RTSP streams of
scene video and gaze, and Time Echo, so that ``neon://HOST:PORT`` (Pupil Labs' own client,
unmodified) reads a recording as if it were live glasses. See ``neon_simulator``.
"""
