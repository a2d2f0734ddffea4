"""The simulator's RTSP streams, served by GStreamer's RTSP server (run as a child process).

Run by Debian's own ``/usr/bin/python3`` (or whichever interpreter has PyGObject and
``gir1.2-gst-rtsp-server-1.0``), not by the project's virtualenv: PyGObject is a system
package. So this module imports nothing from gazecam, nor numpy.

Two servers, one per sensor, each with one shared media mounted at ``/``: the Companion's
sensor URLs are ``rtsp://IP:PORT/?PARAMS``, and with the media at ``/`` GStreamer's
content base (``rtsp://IP:PORT/``) is a URL that the client's SETUP and PLAY map back to it.

- scene video: the recording's H.264 access units as they are (with ``--codec-data``, its
  ``avcC`` record) -> ``rtph264pay``; or raw I420 frames -> ``x264enc`` (baseline, zero
  latency) -> ``rtph264pay``;
- gaze: RTP packets whose payload is Neon's own (written by the parent, see
  ``neon_simulator.gaze_payload``), wrapped here by ``GstRtp`` and sent as they are.

Both go through the server's ``rtpbin``, which sends the RTCP sender reports that map RTP time
to wall-clock time. A buffer's running time is chosen so that this mapping gives the device
timestamp the parent asked for.

Input on stdin, one message after another: a header ``!BqI`` (kind, device time in Unix
nanoseconds, payload length) and the payload. Kinds: 1 a scene frame (I420, BT.601 limited
range, width × height × 3 / 2 bytes), 2 a gaze payload, 3 a command (``drop``: close every
client's connection), 4 and 5 a scene frame as an H.264 access unit (length-prefixed NAL units,
as MP4 stores them), 5 where it is a keyframe. A client that joins gets frames from the next
keyframe on: the ones before it would not decode.
Output on stdout: one line ``ready WORLD_PORT GAZE_PORT`` once both servers listen. An error
is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import struct
import sys
import threading
import time
from typing import Any

HEADER = struct.Struct("!BqI")
KIND_FRAME, KIND_GAZE, KIND_COMMAND, KIND_H264, KIND_H264_KEY = 1, 2, 3, 4, 5
GAZE_CLOCK_HZ = 90_000
GAZE_PAYLOAD_TYPE = 99
GAZE_SSRC = 0x4E454F4E  # "NEON"
RTCP_INTERVAL_NS = 10**9


def main() -> int:
    """Serve the two streams until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--codec-data", help="the H.264 avcC record in hex: frames come encoded")
    args = parser.parse_args()
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtp", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtp, GstRtspServer
    except (ImportError, ValueError) as exc:
        print(
            f"{sys.executable}: no GStreamer RTSP server ({exc}); install python3-gi "
            "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly",
            file=sys.stderr,
        )
        return 2
    Gst.init(None)
    for element in ("appsrc", "x264enc", "rtph264pay"):
        if Gst.ElementFactory.find(element) is None:
            print(
                f"GStreamer has no '{element}' element; install gstreamer1.0-plugins-base, "
                "-good and -ugly",
                file=sys.stderr,
            )
            return 2

    class Media(GstRtspServer.RTSPMedia):  # type: ignore[misc]
        """A media whose sender reports pair a packet's RTP time with its own running time."""

        def do_setup_rtpbin(self, rtpbin: Any) -> bool:
            # By default rtpbin reports the time a packet is sent, which it estimates from
            # the pipeline's latency; our packets carry the time they were captured, and
            # that is the time Neon's reports give.
            rtpbin.set_property("rtcp-sync-send-time", False)
            rtpbin.connect("element-added", on_session_added)
            return True

    def on_session_added(_rtpbin: Any, element: Any) -> None:
        # A sender report every second, not every 5 s: a client yields nothing until the
        # first one has come.
        if element.get_factory().get_name() == "rtpsession":
            element.set_property("rtcp-min-interval", RTCP_INTERVAL_NS)

    sources: dict[str, Any] = {}  # sensor name -> the appsrc of its shared media, once built
    no_keyframe_yet: set[Any] = set()  # the appsrcs that have been given no H.264 keyframe
    lock = threading.Lock()

    def on_configure(_factory: Any, media: Any, name: str) -> None:
        appsrc = media.get_element().get_by_name("src")
        with lock:
            sources[name] = appsrc
            no_keyframe_yet.add(appsrc)

        def on_unprepared(_media: Any) -> None:
            with lock:
                if sources.get(name) is appsrc:
                    del sources[name]
                no_keyframe_yet.discard(appsrc)

        media.connect("unprepared", on_unprepared)

    def serve(name: str, launch: str) -> Any:
        server = GstRtspServer.RTSPServer()
        server.set_address(args.host)
        server.set_service("0")
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch)
        factory.set_shared(True)  # one pipeline, however many clients
        factory.set_media_gtype(Media)
        factory.connect("media-configure", on_configure, name)
        server.get_mount_points().add_factory("/", factory)
        if server.attach(None) == 0:
            raise OSError(f"cannot listen on {args.host}")
        return server

    video_caps = (
        f"video/x-raw,format=I420,width={args.width},height={args.height},"
        f"framerate={args.fps}/1,colorimetry=bt601"
    )
    gaze_caps = (
        # media=video: the client (aiortsp) sets up the first 'video' media of the SDP.
        f"application/x-rtp,media=video,clock-rate={GAZE_CLOCK_HZ},"
        f"encoding-name=X-NEON-GAZE,payload={GAZE_PAYLOAD_TYPE},"
        # The SSRC in the caps tells rtpbin the clock rate of our packets: without it, its
        # sender reports pair the last packet's RTP time with the time of the report.
        f"ssrc=(uint){GAZE_SSRC}"
    )
    if args.codec_data:
        h264_caps = (
            "video/x-h264,stream-format=avc,alignment=au,"
            f"width={args.width},height={args.height},codec_data=(buffer){args.codec_data}"
        )
        video_launch = f"appsrc name=src is-live=true format=time caps={h264_caps}"
    else:
        # A constant quantizer: x264's bitrate control (the default, 2 Mbit/s) took nearly
        # twice the CPU time per frame, for smaller, blurrier frames.
        video_launch = (
            f"appsrc name=src is-live=true format=time caps={video_caps} ! "
            f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} "
            "pass=quant quantizer=25 threads=1 ! video/x-h264,profile=baseline"
        )
    try:
        servers = {
            "world": serve(
                "world", f"( {video_launch} ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
            ),
            "gaze": serve(
                "gaze",
                f"( appsrc name=src is-live=true format=time caps={gaze_caps} ! "
                "identity name=pay0 )",
            ),
        }
    except (OSError, GLib.Error) as exc:
        print(f"RTSP server: {exc}", file=sys.stderr)
        return 2
    clock = Gst.SystemClock.obtain()

    def wall_minus_clock_ns() -> int:
        # The wall clock less the pipeline clock, read where the two reads lie closest
        # together: a read pair split by a preemption would be milliseconds off.
        pairs: list[tuple[int, int]] = []
        for _ in range(5):
            before = clock.get_time()
            wall = time.time_ns()
            pairs.append((clock.get_time() - before, wall - before))
        return min(pairs)[1]

    offset = [wall_minus_clock_ns(), time.monotonic()]  # and when it was measured

    def running_time_ns(appsrc: Any, device_ns: int) -> int | None:
        # rtpbin's sender reports pair the wall clock with the running time, so a buffer
        # whose running time is device_ns on the pipeline clock is reported at device_ns.
        if time.monotonic() - offset[1] > 1:  # follow the wall clock's slewing
            offset[:] = [wall_minus_clock_ns(), time.monotonic()]
        base_ns = appsrc.get_base_time()
        # None before the media plays (no base time yet), and for an item older than the
        # media (it would be stamped with the media's start): nobody could have seen it.
        running_ns: int = device_ns - offset[0] - base_ns
        return running_ns if base_ns > 0 and running_ns >= 0 else None

    def push_frame(kind: int, device_ns: int, data: bytes) -> None:
        with lock:
            appsrc = sources.get("world")
            if appsrc is None:
                return  # nobody watches: a live camera's frame is gone
            pts = running_time_ns(appsrc, device_ns)
            if pts is None:
                return
            if kind == KIND_H264 and appsrc in no_keyframe_yet:
                return  # predicted from a frame this media never had
            no_keyframe_yet.discard(appsrc)
        buffer = Gst.Buffer.new_wrapped(data)
        buffer.pts = pts
        appsrc.emit("push-buffer", buffer)

    gaze_seq = 0

    def push_gaze(device_ns: int, payload: bytes) -> None:
        nonlocal gaze_seq
        with lock:
            appsrc = sources.get("gaze")
        if appsrc is None:
            return
        pts = running_time_ns(appsrc, device_ns)
        if pts is None:
            return
        buffer = GstRtp.RTPBuffer.new_allocate(len(payload), 0, 0)
        ok, rtp = GstRtp.RTPBuffer.map(buffer, Gst.MapFlags.WRITE)
        if not ok:
            raise RuntimeError("cannot map an RTP buffer")
        rtp.set_payload_type(GAZE_PAYLOAD_TYPE)
        rtp.set_seq(gaze_seq & 0xFFFF)
        rtp.set_ssrc(GAZE_SSRC)
        # RTP time runs with the running time, as rtpbin's sender reports assume.
        rtp.set_timestamp((pts * GAZE_CLOCK_HZ // 10**9) & 0xFFFFFFFF)
        GstRtp.RTPBuffer.unmap(rtp)
        buffer.fill(GstRtp.RTPBuffer.calc_header_len(0), payload)
        buffer.pts = pts
        gaze_seq += 1
        appsrc.emit("push-buffer", buffer)

    def drop_clients() -> None:
        for server in servers.values():
            server.client_filter(lambda _server, _client: GstRtspServer.RTSPFilterResult.REMOVE)

    loop = GLib.MainLoop()

    def read_input() -> None:
        stdin = sys.stdin.buffer
        try:
            while header := stdin.read(HEADER.size):
                kind, device_ns, length = HEADER.unpack(header)
                payload = stdin.read(length)
                if len(payload) < length:
                    break
                if kind in (KIND_FRAME, KIND_H264, KIND_H264_KEY):
                    push_frame(kind, device_ns, payload)
                elif kind == KIND_GAZE:
                    push_gaze(device_ns, payload)
                elif kind == KIND_COMMAND and payload == b"drop":
                    GLib.idle_add(drop_clients)
        finally:
            GLib.idle_add(loop.quit)

    print("ready", servers["world"].get_bound_port(), servers["gaze"].get_bound_port(), flush=True)
    threading.Thread(target=read_input, daemon=True).start()
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
