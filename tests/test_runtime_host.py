"""The host side of ``infer``: labels brought to the frame's size exactly as a graph that resized its
logits would give them, fast mask PNGs that read back the same, overlays, reduced JPEG decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from promptseg.data.images import load_rgb, load_rgb_reduced
from promptseg.errors import PromptsegError
from promptseg.runtime.processing import (
    encode_mask_png,
    overlay,
    tint_in_place,
    tint_yuv420_in_place,
    to_model_size,
    upsample_labels,
)

PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128)]


def _smooth_logits(classes: int, size_hw: tuple[int, int], seed: int) -> np.ndarray:
    """Logits as a segmenter gives them: coarse maps bilinearly upsampled (so labels form regions)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.normal(0, 3, (1, classes, 6, 7)).astype(np.float32))
    return F.interpolate(coarse, size=size_hw, mode="bilinear", align_corners=False)[0].numpy()


def _reference_labels(logits: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """What the exported graph computes when it resizes its logits: torch's bilinear, then argmax."""
    resized = F.interpolate(torch.from_numpy(logits)[None], size=size_hw, mode="bilinear", align_corners=False)
    return resized[0].argmax(0).numpy()


@pytest.mark.parametrize(("classes", "low_hw", "out_hw"), [
    (6, (64, 64), (1080, 1920)),  # a 64 px network, a 1080p frame
    (3, (32, 32), (61, 97)),  # odd sizes, different scales along the two axes
    (21, (64, 64), (375, 500)),  # VOC's class count
    (4, (32, 32), (20, 13)),  # a frame smaller than the network
    (2, (8, 8), (8, 8)),  # identity
])
def test_upsampled_labels_are_the_argmax_of_the_bilinearly_resized_logits(classes, low_hw, out_hw):
    logits = _smooth_logits(classes, low_hw, seed=classes)
    got = upsample_labels(logits, out_hw)
    want = _reference_labels(logits, out_hw)
    assert got.shape == out_hw and got.dtype == np.uint8
    assert (got == want).mean() >= 0.99999  # float rounding may flip an exact tie, nothing else
    assert len(np.unique(want)) > 1  # the case has boundaries to get right


def test_upsampling_interpolates_between_regions_not_blocks():
    """Nearest-neighbour upsampling of the low-resolution labels would put the boundary on the cell
    edge; the bilinear argmax puts it where the two logits cross."""
    logits = np.zeros((2, 1, 2), np.float32)
    logits[1, 0] = [-1.0, 3.0]  # class 1 wins the right cell; the crossing is 1/4 of the way from the left centre
    labels = upsample_labels(logits, (1, 16))[0]
    np.testing.assert_array_equal(labels, _reference_labels(logits, (1, 16))[0])
    assert labels.tolist() == [0] * 6 + [1] * 10  # nearest would give 8 + 8


def test_upsample_refuses_bad_logits():
    with pytest.raises(PromptsegError, match=r"logits: got shape \(4, 4\) \| expected \(C, h, w\)"):
        upsample_labels(np.zeros((4, 4), np.float32), (8, 8))


@pytest.mark.parametrize("colours", [6, 21])  # 4-bit and 8-bit palettes
def test_mask_png_reads_back_the_same_labels_and_palette(colours):
    palette = [(i, 255 - i, (7 * i) % 256) for i in range(colours)]
    labels = upsample_labels(_smooth_logits(colours, (16, 16), seed=1), (90, 160))
    image = Image.open(io.BytesIO(encode_mask_png(labels, palette)))
    assert image.format == "PNG" and image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), labels)
    assert image.getpalette()[: 3 * colours] == [c for rgb in palette for c in rgb]


def test_the_tinted_frame_is_the_numpy_overlay_within_rounding():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (45, 80, 3), dtype=np.uint8)
    labels = upsample_labels(_smooth_logits(6, (8, 8), seed=2), (45, 80))
    labels[:, :3] = 0  # background at the edge: the blended box is smaller than the frame
    got = np.asarray(tint_in_place(Image.fromarray(frame), labels, PALETTE)).astype(int)
    want = overlay(frame, labels, PALETTE).astype(int)
    assert np.abs(got - want).max() <= 1
    np.testing.assert_array_equal(got[labels == 0], frame[labels == 0])  # background untouched
    assert np.abs(got[labels > 0] - frame[labels > 0]).mean() > 10  # foreground tinted


def test_yuv_tint_is_the_rgb_overlay_seen_through_the_video_colour_matrix():
    """Tinting the decoded planes equals tinting in RGB, up to YUV rounding (the blend is linear)."""
    av = pytest.importorskip("av")
    rng = np.random.default_rng(1)
    rgb = np.repeat(np.repeat(rng.integers(30, 220, (26, 12, 3), dtype=np.uint8), 8, 0), 8, 1)  # 208 x 96, flat 8x8
    labels = np.zeros((208, 96), np.uint8)
    # even-aligned regions (chroma blocks are not split), across the 64-row strips the tint works in
    labels[16:150, 8:56], labels[8:24, 64:88], labels[120:200, 60:90] = 2, 5, 3
    planes = av.VideoFrame.from_ndarray(rgb, format="rgb24").to_ndarray(format="yuv420p")
    tinted = tint_yuv420_in_place(planes.copy(), labels, PALETTE)
    seen = av.VideoFrame.from_ndarray(tinted, format="yuv420p").to_ndarray(format="rgb24").astype(int)
    untouched = av.VideoFrame.from_ndarray(planes, format="yuv420p").to_ndarray(format="rgb24").astype(int)
    want = overlay(untouched.astype(np.uint8), labels, PALETTE).astype(int)
    assert np.abs(seen - want).max() <= 4
    np.testing.assert_array_equal(seen[labels == 0], untouched[labels == 0])
    with pytest.raises(PromptsegError, match=r"yuv420p planes: got \(208, 96\) for labels \(208, 96\)"):
        tint_yuv420_in_place(np.zeros((208, 96), np.uint8), labels, PALETTE)


@pytest.mark.parametrize("size_hw", [(1080, 1920), (61, 97), (20, 13)])  # down, odd, up
def test_frames_are_sampled_to_the_networks_size_as_the_graph_samples_them(size_hw):
    """The host feeds the graph what its own Resize (torch's bilinear, half-pixel centres, no antialiasing)
    would make of the full frame: the trained network saw exactly that."""
    image = np.random.default_rng(0).integers(0, 256, (*size_hw, 3), dtype=np.uint8)
    got = to_model_size(Image.fromarray(image), (64, 48))
    graph = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(64, 48), mode="bilinear",
                          align_corners=False)[0].permute(1, 2, 0).numpy()
    assert got.shape == (64, 48, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(np.float32) - graph).max() <= 0.5 + 1e-3  # rounding to uint8 only
    same = np.zeros((64, 48, 3), np.uint8)
    assert to_model_size(same, (64, 48)) is same


def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)


def test_jpegs_decode_reduced_to_what_the_consumer_needs(tmp_path):
    Image.fromarray(_gradient(1080, 1920)).save(tmp_path / "frame.jpg", quality=95)
    reduced, full = load_rgb_reduced(tmp_path / "frame.jpg", (64, 64))
    reduced = np.asarray(reduced)
    assert full == (1920, 1080) and reduced.shape == (135, 240, 3)  # 1/8: the largest that keeps >= 64
    whole = load_rgb(tmp_path / "frame.jpg")
    small = np.asarray(Image.fromarray(whole).resize((240, 135), Image.BILINEAR)).astype(int)
    assert np.abs(reduced.astype(int) - small).mean() < 3  # the same picture, decoded smaller
    assert load_rgb_reduced(tmp_path / "frame.jpg", (1000, 600))[0].size == (1920, 1080)  # no 1/2 keeps 1000
    Image.fromarray(_gradient(120, 200)).save(tmp_path / "frame.png")
    assert load_rgb_reduced(tmp_path / "frame.png", (16, 16))[0].size == (200, 120)  # PNG: no DCT scaling


def test_reduced_decoding_keeps_the_exif_orientation(tmp_path):
    stored = _gradient(400, 800)  # stored landscape, shown portrait (orientation 6: rotate 90 clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    reduced, full = load_rgb_reduced(tmp_path / "phone.jpg", (50, 100))
    reduced = np.asarray(reduced)
    # displayed W x H = 400 x 800: 1/8 keeps 50 x 100 (a request read in the stored orientation would stop at 1/4)
    assert full == (400, 800) and reduced.shape == (100, 50, 3)
    upright = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270).resize((50, 100)))
    assert np.abs(reduced.astype(int) - upright.astype(int)).mean() < 4


def test_the_graph_gets_chw_rgb_in_0_to_1():
    from promptseg.runtime.processing import stack_batch

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(2)]
    batch = stack_batch(images)
    assert batch.shape == (2, 3, 5, 7) and batch.dtype == np.float32 and batch.flags.c_contiguous
    np.testing.assert_allclose(batch[1, 2], images[1][:, :, 2] / 255.0, rtol=1e-6)  # channel 2 is blue


def test_frames_held_at_once_stay_bounded_whatever_the_batch(tmp_path, monkeypatch):
    """The pipeline holds the batch being filled plus a few frames per worker, not a batch-sized queue on
    each side: with post-processing the slow stage, every queue fills, so a deeper one would show."""
    import threading
    import time

    from test_runtime_models import tiny_segmenter

    from promptseg.runtime import infer as infer_module
    from promptseg.runtime.sources import ImageFiles

    model = tiny_segmenter(tmp_path / "seg.onnx")
    for i in range(40):
        Image.fromarray(_gradient(48, 64 + i)).save(tmp_path / f"frame_{i:02d}.png")
    held, peak, lock = [0], [0], threading.Lock()
    load, finish = ImageFiles.load, infer_module._Outputs.finish

    def counted_load(self, index):
        frame = load(self, index)
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        return frame

    def slow_finish(self, frame, logits):
        time.sleep(0.01)
        try:
            return finish(self, frame, logits)
        finally:
            with lock:
                held[0] -= 1

    monkeypatch.setattr(ImageFiles, "load", counted_load)
    monkeypatch.setattr(infer_module._Outputs, "finish", slow_finish)
    batch, workers = 8, 2
    summary = infer_module.run_infer(infer_module.InferConfig(
        model=str(model), inputs=(str(tmp_path),), out=str(tmp_path / "out"), batch=batch, workers=workers,
        overlay=True))
    assert summary["succeeded"] == 40 and held[0] == 0
    # the batch, workers + 1 decoding ahead, workers + 1 queued for the sink, one per worker being finished
    assert batch + workers <= peak[0] <= batch + 3 * workers + 2
