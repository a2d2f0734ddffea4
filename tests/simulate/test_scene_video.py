"""How the simulator sends the scene video: the recording's own H.264 where a Neon could have
sent it (no B-frames, keyframes close enough), re-encoded otherwise; and what a client decodes
of it, after a stall as before."""

from __future__ import annotations

import asyncio
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from pupil_labs.realtime_api.streaming import receive_video_frames

from gazecam.errors import SourceError
from gazecam.records import SceneFrame, SourceInfo
from gazecam.simulate import gst_rtsp
from gazecam.simulate.scene_video import H264Track, Passthrough, Reencode, probe_passthrough
from gazecam.sources import scene_video_files
from gazecam.sources.synthetic import read_frame_code
from tests.conftest import SCENE_VIDEO, two_part_recording
from tests.simulate.test_neon_simulator import recorded, simulator

W, H = 64, 48


def write_video(path: Path, frames: int, **options: str) -> Path:
    """A small H.264 MP4 of ``frames`` frames at 30 Hz, with libx264 ``options``."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = options
        for i in range(frames):
            pixels = np.full((H, W, 3), i * 4 % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="bgr24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def info(frames: int, width: int = W, height: int = H) -> SourceInfo:
    return SourceInfo("test", "neon-recording", width, height, frame_count=frames)


def test_the_neon_demo_video_is_sent_as_it_is(neon_demo: Path) -> None:
    parts = scene_video_files(str(neon_demo))
    assert parts == [neon_demo / SCENE_VIDEO]
    frames = np.fromfile(neon_demo / "Neon Scene Camera v1 ps1.time", dtype="<i8").size
    track = probe_passthrough(parts, info(frames, 1600, 1200))
    assert isinstance(track, H264Track)
    with av.open(str(parts[0])) as container:
        assert track.codec_data == bytes(container.streams.video[0].codec_context.extradata)


@pytest.mark.parametrize(
    ("options", "frames", "why"),
    [
        ({"bf": "2", "g": "30"}, 60, "has B-frames"),
        ({"bf": "0", "g": "90"}, 120, "keyframes further apart than 2 s"),
        ({"bf": "0", "g": "30"}, 59, "the video has 60 frames, its timestamps list 59"),
    ],
)
def test_a_video_a_neon_could_not_have_streamed_is_re_encoded(
    tmp_path: Path, options: dict[str, str], frames: int, why: str
) -> None:
    video = write_video(tmp_path / "scene.mp4", 60 if frames == 59 else frames, **options)
    reason = probe_passthrough([video], info(frames))
    assert isinstance(reason, str) and why in reason, reason


def test_other_reasons_to_re_encode(tmp_path: Path) -> None:
    video = write_video(tmp_path / "scene.mp4", 30, bf="0")
    assert "is 64×48" in str(probe_passthrough([video], info(30, 32, 24)))
    assert probe_passthrough([], info(30)) == "the source has no video file"
    assert scene_video_files("synthetic:demo") == []
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    assert str(probe_passthrough([garbage], info(30))).startswith("cannot read garbage.mp4")


def frame(index: int) -> SceneFrame:
    def no_pixels() -> np.ndarray:
        raise AssertionError("passthrough decodes nothing")

    return SceneFrame(index * 33_333_333, index, W, H, decode=no_pixels)


async def test_passthrough_sends_packets_as_stored_and_restarts_at_a_keyframe(
    tmp_path: Path,
) -> None:
    video = write_video(tmp_path / "scene.mp4", 60, bf="0", g="30")
    track = probe_passthrough([video], info(60))
    assert isinstance(track, H264Track)
    with av.open(str(video)) as container:
        stored = [bytes(p) for p in container.demux(container.streams.video[0]) if p.size]
    video_out = Passthrough(track)
    try:
        sent = [await video_out.payload(frame(i)) for i in range(5)]
        assert sent[0] == (gst_rtsp.KIND_H264_KEY, stored[0])
        assert sent[1:] == [(gst_rtsp.KIND_H264, stored[i]) for i in range(1, 5)]
        video_out.skipped()  # frame 5 was not sent: 6 to 29 would not decode
        assert [await video_out.payload(frame(i)) for i in range(6, 30)] == [None] * 24
        assert await video_out.payload(frame(30)) == (gst_rtsp.KIND_H264_KEY, stored[30])
        assert await video_out.payload(frame(31)) == (gst_rtsp.KIND_H264, stored[31])
        # A looped recording's next pass starts again from the first packet.
        assert await video_out.payload(frame(0)) == (gst_rtsp.KIND_H264_KEY, stored[0])
    finally:
        video_out.close()


async def test_the_parts_of_a_recording_are_sent_as_one_video(
    tmp_path: Path, neon_demo: Path
) -> None:
    rec = two_part_recording(tmp_path / "two-parts", neon_demo, 150)
    parts = scene_video_files(str(rec))
    assert [p.name for p in parts] == [SCENE_VIDEO, SCENE_VIDEO.replace("ps1", "ps2")]
    track = probe_passthrough(parts, info(292, 1600, 1200))
    assert isinstance(track, H264Track), track
    stored = []
    for part in parts:
        with av.open(str(part)) as container:
            stored += [bytes(p) for p in container.demux(container.streams.video[0]) if p.size]
    video_out = Passthrough(track)
    try:
        for i in (0, 149, 150, 291):  # the last of part 1, the first of part 2 (a keyframe)
            sent = await video_out.payload(frame(i))
            assert sent is not None and sent[1] == stored[i]
        assert sent[0] == gst_rtsp.KIND_H264
        with pytest.raises(SourceError, match="no packet for frame 292"):
            await video_out.payload(frame(292))
    finally:
        video_out.close()


async def test_reencode_hands_over_i420_and_refuses_a_frame_of_another_size() -> None:
    video_out = Reencode("test", info(1))
    bgr = np.zeros((H, W, 3), dtype=np.uint8)
    sent = await video_out.payload(SceneFrame(0, 0, W, H, decode=lambda: bgr))
    assert sent is not None and sent[0] == gst_rtsp.KIND_FRAME
    assert len(sent[1]) == W * H * 3 // 2
    small = np.zeros((H // 2, W, 3), dtype=np.uint8)
    with pytest.raises(SourceError, match=f"frame 1 is {W}×{H // 2}, not {W}×{H}"):
        await video_out.payload(SceneFrame(0, 1, W, H, decode=lambda: small))


async def test_after_a_stalled_video_the_client_decodes_the_right_frames(
    neon_demo: Path,
) -> None:
    """Through the RTSP server and Pupil Labs' client: the recording's own frames before and
    after a stall, each the one its timestamp says, none half decoded."""
    rec_gaze, rec_frames = await recorded(neon_demo)
    first_ns = min(rec_gaze[0].timestamp_ns, rec_frames[0].timestamp_ns)  # the simulator's start
    async with simulator(neon_demo, sim_loop=True) as sim:
        assert sim.video_mode == "the recording's H.264 as it is"
        got: list[tuple[int, int]] = []  # (timestamp, frame code)

        async def read() -> None:
            url = f"rtsp://127.0.0.1:{sim.rtsp_ports[0]}/?camera=world"
            async for video_frame in receive_video_frames(url):
                code = read_frame_code(video_frame.bgr_buffer())
                got.append((video_frame.timestamp_unix_ns, code))
                if len(got) == 20:
                    sim.stall("video", 1.5)

        reader = asyncio.create_task(read())
        for _ in range(100):
            await asyncio.sleep(0.1)
            if len(got) >= 50:
                break
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        skipped = sim.stats.frames_skipped
    assert len(got) >= 50 and skipped >= 40, (len(got), skipped)
    codes = [code for _, code in got]
    gap = max(range(1, len(codes)), key=lambda i: got[i][0] - got[i - 1][0])
    assert got[gap][0] - got[gap - 1][0] > 1.4e9  # the stall
    assert codes[gap] % 30 == 0  # the first frame after it is a keyframe (one a second)
    # Every frame decodes to the recorded frame its timestamp names, in order.
    assert codes == sorted(codes) and codes[-1] < len(rec_frames)
    start_ns = sim.started_wall_ns
    for t_ns, code in got:
        recorded_ns = rec_frames[code].timestamp_ns - first_ns
        assert abs(t_ns - start_ns - recorded_ns) < 2e6, (code, t_ns - start_ns, recorded_ns)
