"""load_rgb on odd files: EXIF orientation, 16-bit and float grey, transparency in every mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptseg.data.images import BACKGROUND, image_size, load_rgb
from promptseg.errors import DataError

# A 3 x 4 RGB picture whose every pixel differs, so any flip or turn shows.
STORED = np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3) * 7

# What a viewer shows for each EXIF orientation, written with numpy only (not with Pillow's transpose).
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # turned 180 degrees
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored across the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # stored turned left: turn 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored across the anti-diagonal
    8: lambda a: np.rot90(a, k=1),  # stored turned right: turn 90 degrees counter-clockwise
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# ----------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int):
    path = tmp_path / "photo.png"  # PNG keeps pixels exact; its eXIf chunk carries the orientation
    Image.fromarray(STORED).save(path, exif=_exif(orientation))
    expected = DISPLAYED[orientation](STORED)
    np.testing.assert_array_equal(load_rgb(path), expected)
    assert image_size(path) == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(load_rgb(path, exif=False), STORED)
    assert image_size(path, exif=False) == (4, 3)


def test_exif_orientation_of_a_sideways_jpeg(tmp_path: Path):
    """The phone case: a landscape JPEG bitmap tagged "turn 90 degrees clockwise" loads as portrait."""
    stored = np.zeros((40, 80, 3), dtype=np.uint8)
    stored[:, :40] = (250, 10, 10)  # left half red, right half blue
    stored[:, 40:] = (10, 10, 250)
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=_exif(6))
    image = load_rgb(path)
    assert image.shape == (80, 40, 3)
    assert image[:30, :, 0].min() > 200 and image[:30, :, 2].max() < 60  # the old left half is now on top
    assert image[50:, :, 2].min() > 200 and image[50:, :, 0].max() < 60


# ----------------------------------------------------------------------------- 16-bit and 32-bit grey


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_scales_by_a_fixed_factor(tmp_path: Path, suffix: str):
    """A dark 12-bit camera frame stays dark: v / 257, never stretched to the image's own peak."""
    values = np.array([[0, 257, 1000], [2056, 4095, 65535 // 2]], dtype=np.uint16)
    path = tmp_path / f"grey16{suffix}"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    expected = np.rint(values / 257.0).astype(np.uint8)  # [[0, 1, 4], [8, 16, 127]]
    image = load_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (2, 3, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], expected)


def test_16_bit_full_range_reaches_255(tmp_path: Path):
    path = tmp_path / "full.png"
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(path)
    np.testing.assert_array_equal(load_rgb(path)[0, :, 0], [0, 255])


def test_32_bit_integer_grey_in_16_bit_range_scales_alike(tmp_path: Path):
    path = tmp_path / "int32.tif"
    Image.fromarray(np.array([[0, 514, 2570]], dtype=np.int32)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I"
    np.testing.assert_array_equal(load_rgb(path)[0, :, 1], [0, 2, 10])


def test_32_bit_integer_grey_beyond_16_bits_is_refused(tmp_path: Path):
    path = tmp_path / "int32.tif"
    Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)).save(path)
    with pytest.raises(DataError, match=r"'I' integer image values range -5\.\.70000 \| expected 0\.\.65535"):
        load_rgb(path)


# ----------------------------------------------------------------------------- float images


def test_float_image_in_unit_range_scales_by_255(tmp_path: Path):
    values = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.1]], dtype=np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode == "F"
    image = load_rgb(path)
    np.testing.assert_array_equal(image[:, :, 2], np.rint(values * 255.0).astype(np.uint8))


def test_float_image_outside_unit_range_is_refused(tmp_path: Path):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.array([[0.0, 2.5], [4.0, 1.0]], dtype=np.float32)).save(path)
    with pytest.raises(DataError, match=r"depth\.tif: float image values range 0\.\.4 \| expected 0\.\.1"):
        load_rgb(path)


def test_float_image_with_nan_is_refused(tmp_path: Path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)).save(path)
    with pytest.raises(DataError, match=r"nan\.tif: float image holds NaN or infinite values"):
        load_rgb(path)


# ----------------------------------------------------------------------------- transparency

GREY = np.array([[10, 20], [30, 40]], dtype=np.uint8)  # (0, 0) is the transparent pixel below
WHITE = np.array(BACKGROUND, dtype=np.uint8)


def _write_transparent(path: Path, mode: str) -> np.ndarray:
    """A 2 x 2 image of ``mode`` whose top-left pixel is fully transparent; returns the expected RGB."""
    rgb = np.repeat(GREY[:, :, None], 3, axis=2)
    alpha = np.full((2, 2), 255, dtype=np.uint8)
    alpha[0, 0] = 0
    if mode == "RGBA":
        Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(path)
    elif mode == "LA":
        Image.fromarray(np.dstack([GREY, alpha]), mode="LA").save(path)
    elif mode == "L+tRNS":
        Image.fromarray(GREY, mode="L").save(path, transparency=int(GREY[0, 0]))
    elif mode == "RGB+tRNS":
        Image.fromarray(rgb).save(path, transparency=tuple(int(v) for v in rgb[0, 0]))
    elif mode == "P+tRNS":
        img = Image.fromarray(GREY, mode="P")
        img.putpalette([v for g in range(256) for v in (g, g, g)])
        img.save(path, transparency=int(GREY[0, 0]))
    elif mode == "I;16+tRNS":
        Image.fromarray(GREY.astype(np.uint16) * 257).save(path, transparency=int(GREY[0, 0]) * 257)
    else:
        raise AssertionError(mode)
    expected = rgb.copy()
    expected[0, 0] = WHITE
    return expected


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L+tRNS", "RGB+tRNS", "P+tRNS", "I;16+tRNS"])
def test_transparent_pixels_become_the_background_in_every_mode(tmp_path: Path, mode: str):
    path = tmp_path / "transparent.png"
    expected = _write_transparent(path, mode)
    with Image.open(path) as img:
        assert img.mode == mode.split("+")[0]
    np.testing.assert_array_equal(load_rgb(path), expected)


def test_half_transparent_pixels_blend_with_the_background(tmp_path: Path):
    path = tmp_path / "half.png"
    Image.fromarray(np.array([[[0, 0, 0, 128]]], dtype=np.uint8), mode="RGBA").save(path)
    assert abs(int(load_rgb(path)[0, 0, 0]) - 127) <= 1


def test_opaque_modes_are_unchanged(tmp_path: Path):
    path = tmp_path / "plain.png"
    Image.fromarray(GREY, mode="L").save(path)
    np.testing.assert_array_equal(load_rgb(path), np.repeat(GREY[:, :, None], 3, axis=2))


# ----------------------------------------------------------------------------- errors


def test_missing_and_unreadable_files_name_the_file(tmp_path: Path):
    with pytest.raises(DataError, match=r"nowhere\.png: image file not found"):
        load_rgb(tmp_path / "nowhere.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk\.jpg: not an image Pillow can read"):
        load_rgb(junk)
    with pytest.raises(DataError, match=r"junk\.jpg: not an image Pillow can read"):
        image_size(junk)
