"""``promptseg infer`` on a video (PyAV, the ``[video]`` extra): an overlay video with the same frame
count, one mask per frame equal to the runner on that frame alone, undecodable packets counted and
skipped, streams and cameras opened as FFmpeg wants them, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_runtime_models import tiny_segmenter

from promptseg.cli import main
from promptseg.errors import PromptsegError
from promptseg.runtime import sources
from promptseg.runtime.infer import InferConfig, run_infer

av = pytest.importorskip("av", reason="PyAV is the [video] extra")

FRAMES, FPS, SIZE_WH = 50, 25, (96, 64)  # a 2-second clip


def _frames(count: int) -> list[np.ndarray]:
    """Moving bars, so consecutive frames differ and a swapped or dropped frame shows."""
    width, height = SIZE_WH
    x = np.arange(width)
    frames = []
    for i in range(count):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 0] = ((x + 3 * i) % 32 < 16) * 200
        frame[: height // 2, :, 2] = (i * 5) % 256
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray], codec: str = "libx264") -> Path:
    container = av.open(str(path), mode="w")
    stream = container.add_stream(codec, rate=FPS)
    stream.width, stream.height, stream.pix_fmt = *SIZE_WH, "yuv420p"
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()
    return path


def _decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", _frames(FRAMES))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_segmenter(tmp_path_factory.mktemp("video_model") / "seg.onnx")


def test_a_two_second_video_gives_an_overlay_video_with_the_same_frame_count(model, clip, tmp_path):
    result = CliRunner().invoke(main, ["infer", str(model), "--input", str(clip), "--out", str(tmp_path / "out"),
                                       "--overlay", "--batch", "4"])
    assert result.exit_code == 0, result.output
    assert f"{FRAMES} of {FRAMES} frames" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["input"] == "video" and summary["succeeded"] == FRAMES and summary["failed"] == 0
    assert summary["video"]["fps"] == FPS and summary["video"]["size_wh"] == list(SIZE_WH)
    overlay = _decoded(tmp_path / "out" / "overlay.mp4")
    assert len(overlay) == FRAMES and overlay[0].shape == (SIZE_WH[1], SIZE_WH[0], 3)
    masks = sorted((tmp_path / "out" / "masks").iterdir())
    assert [m.name for m in masks] == [f"clip_{i:06d}.png" for i in range(FRAMES)]
    assert all(Image.open(m).size == SIZE_WH for m in masks[:3])
    for stage in ("decode", "pre", "graph", "post", "encode"):
        assert len(summary["video"]["per_frame_ms"][stage]) == FRAMES
        assert 0 <= summary["timing_ms"][stage]["p50"] <= summary["timing_ms"][stage]["p90"]
    assert summary["frames_per_s"] > 0


def test_each_frames_mask_is_the_runner_on_that_frame_alone(model, clip, tmp_path):
    from promptseg.runtime.backends import open_runner
    from promptseg.runtime.processing import stack_batch, to_model_size, upsample_labels

    summary = run_infer(InferConfig(model=str(model), inputs=(str(clip),), out=str(tmp_path), batch=3, max_frames=7))
    assert summary["succeeded"] == 7 and summary["video"]["frames"] == 7  # --max-frames
    with av.open(str(clip)) as container, open_runner(str(model)) as runner:
        h, w = runner.metadata.input_size
        for i, frame in enumerate(container.decode(video=0)):
            if i == 7:
                break
            feed = stack_batch([to_model_size(frame.to_ndarray(format="rgb24"), (h, w))])
            alone = upsample_labels(runner.infer({"image": feed})["logits"][0], (SIZE_WH[1], SIZE_WH[0]))
            written = np.asarray(Image.open(tmp_path / "masks" / f"clip_{i:06d}.png"))
            np.testing.assert_array_equal(written, alone, err_msg=f"frame {i}")
    masks = [np.asarray(Image.open(tmp_path / "masks" / f"clip_{i:06d}.png")) for i in range(7)]
    assert not all(np.array_equal(masks[0], m) for m in masks[1:])  # frames differ, so order matters


def test_packets_that_fail_to_decode_are_counted_and_skipped(model, tmp_path):
    data = bytearray(write_video(tmp_path / "clip.mp4", _frames(FRAMES)).read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 300, 7):  # scramble bytes inside the frame data
        data[offset] = (data[offset] * 31 + 7) % 256
    (tmp_path / "bad.mp4").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["infer", str(model), "--input", str(tmp_path / "bad.mp4"),
                                       "--out", str(tmp_path / "out"), "--overlay"])
    assert result.exit_code == 0, result.output  # not fatal
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    skipped = summary["video"]["failed_to_decode"]
    assert skipped >= 1 and f"warning: {skipped} packets of the video could not be decoded" in result.output
    assert 0 < summary["succeeded"] and summary["succeeded"] + skipped <= FRAMES  # the decoder may drop more
    assert len(list((tmp_path / "out" / "masks").iterdir())) == summary["succeeded"]
    assert len(_decoded(tmp_path / "out" / "overlay.mp4")) == summary["succeeded"]


def test_streams_and_cameras_open_through_ffmpeg(monkeypatch):
    opened = []

    def refuse(url, **kwargs):
        opened.append((url, kwargs))
        raise av.FFmpegError(5, "Input/output error")

    monkeypatch.setattr(av, "open", refuse)
    with pytest.raises(PromptsegError, match=r"rtsp://cam\.local/live: PyAV cannot open it"):
        sources.VideoSource("rtsp://cam.local/live", (32, 32), False)
    with pytest.raises(PromptsegError, match=r"/dev/video0: PyAV cannot open it"):
        sources.VideoSource("/dev/video0", (32, 32), False)
    assert opened[0][0] == "rtsp://cam.local/live" and "format" not in opened[0][1]
    assert opened[1] == ("/dev/video0", {"mode": "r", "timeout": 10.0, "format": "v4l2"})


@pytest.mark.parametrize(("inputs", "match"), [
    (("missing.mp4",), r"missing\.mp4: video file not found"),
    (("a.mp4", "b.png"), r"inputs: got 2 inputs with the video a\.mp4 \| expected one video"),
])
def test_bad_video_inputs_are_clear_errors(model, tmp_path, inputs, match):
    with pytest.raises(PromptsegError, match=match):
        run_infer(InferConfig(model=str(model), inputs=inputs, out=str(tmp_path)))


def test_a_file_without_a_video_stream_is_refused(model, tmp_path):
    (tmp_path / "text.mp4").write_text("not a video\n")
    with pytest.raises(PromptsegError, match=r"text\.mp4: PyAV cannot open it"):
        run_infer(InferConfig(model=str(model), inputs=(str(tmp_path / "text.mp4"),), out=str(tmp_path / "o")))


def test_without_pyav_video_input_says_how_to_get_it(model, tmp_path, monkeypatch, clip):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(PromptsegError, match=r"video input needs PyAV: pip install 'promptseg\[video\]'"):
        run_infer(InferConfig(model=str(model), inputs=(str(clip),), out=str(tmp_path)))


def test_bench_end_to_end_reports_each_stage_per_frame_for_a_video(model, clip, tmp_path):
    out = tmp_path / "framerate.json"
    result = CliRunner().invoke(main, ["bench", str(model), "--input", str(clip), "--batch", "1", "--batch", "4",
                                       "--max-frames", "20", "--overlay", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["kind"], r["batch"], r["frames"], r["overlay"]) for r in rows] == [("video", 1, 20, True),
                                                                                   ("video", 4, 20, True)]
    for row in rows:
        assert set(row["timing_ms"]) == {"decode", "pre", "graph", "post", "encode"}
        assert row["ms_per_frame"] == pytest.approx(1e3 / row["frames_per_s"])
        assert row["end_to_end_over_graph"] == pytest.approx(row["ms_per_frame"] / row["graph_only_ms_per_frame"])
        assert 0 < row["peak_rss_mb"] < 1000
    assert "| video | onnxruntime | 4 | yes |" in result.output
