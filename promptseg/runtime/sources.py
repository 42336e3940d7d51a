"""Where ``infer``'s frames come from: image files, or one video file, RTSP/HTTP stream or V4L2
camera decoded by PyAV (the ``[video]`` extra).

A source yields :class:`Frame` objects in input order, each already resized to the network's input
size (the only pixels the graph needs) and, when overlays are asked for, holding the full-size RGB
frame too. A frame that cannot be used carries its reason instead; the run goes on without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import numpy as np
from PIL import Image

from ..data.images import load_rgb_reduced
from ..errors import DataError, PromptsegError
from .processing import decode_size, to_model_size

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            ".pnm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".ts", ".flv"})
_STREAM_URL = re.compile(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp|srt)://", re.IGNORECASE)
_CAMERA = re.compile(r"^/dev/video\d+$")


@dataclass
class Frame:
    """One input frame on its way through ``infer``.

    ``model_input``: ``h x w x 3`` uint8 at the network's input size; ``full``: the full-size frame,
    kept only for overlays (an RGB image, or a video frame's ``yuv420p`` planes); ``size_wh``: the
    displayed size the mask is written at;
    ``ms``: milliseconds per host stage, filled as the frame moves on."""

    index: int
    name: str
    source: str
    size_wh: tuple[int, int] = (0, 0)
    model_input: np.ndarray | None = None
    full: Image.Image | np.ndarray | None = None
    reason: str | None = None
    ms: dict[str, float] = field(default_factory=dict)


def is_video(item: str) -> bool:
    """A video file (by suffix), a stream URL or a V4L2 camera device."""
    return bool(_STREAM_URL.match(item) or _CAMERA.match(item)) or Path(item).suffix.lower() in VIDEO_SUFFIXES


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files as given (whatever their suffix) and the image files of folders (sorted, not recursive);
    duplicates dropped. A missing file is kept: it is reported with the others."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PromptsegError(f"{path}: no image files | expected {', '.join(sorted(IMAGE_SUFFIXES))}")
            files.extend(found)
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def output_names(paths: Sequence[Path]) -> list[str]:
    """One output stem per input: the file's stem, made unique when two inputs share it."""
    from collections import Counter

    counts = Counter(p.stem for p in paths)
    names, used = [], set()
    for path in paths:
        base = path.stem if counts[path.stem] == 1 else f"{path.stem}_{path.suffix.lstrip('.').lower()}"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        names.append(name)
    return names


def check_pixels(path: Path, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` (read before decoding), and
    turn Pillow's decompression-bomb refusal into a reason."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError):
        return  # not readable at all: the decoder names the reason
    if width * height > max_pixels:
        raise DataError(f"{path}: {width}x{height} (WxH) is {width * height} pixels | expected at most "
                        f"{max_pixels} (--max-pixels)")


class ImageFiles:
    """Image files; :meth:`load` is independent per index, so files decode in parallel threads."""

    kind = "images"

    def __init__(self, paths: Sequence[Path], model_hw: tuple[int, int], keep_full: bool, max_pixels: int):
        self.paths, self.names = list(paths), output_names(paths)
        self.model_hw, self.keep_full, self.max_pixels = model_hw, keep_full, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Frame:
        path = self.paths[index]
        frame = Frame(index, self.names[index], str(path))
        tick = perf_counter()
        try:
            check_pixels(path, self.max_pixels)
            # overlays need every pixel; masks only what sampling to the network's size reads well
            need = (1 << 30, 1 << 30) if self.keep_full else decode_size(self.model_hw)
            image, frame.size_wh = load_rgb_reduced(path, need)
        except DataError as exc:
            frame.reason = str(exc)
            return frame
        frame.ms["decode"] = (perf_counter() - tick) * 1e3
        tick = perf_counter()
        frame.model_input = to_model_size(image, self.model_hw)
        frame.full = image if self.keep_full else None
        frame.ms["pre"] = (perf_counter() - tick) * 1e3
        return frame


def import_av():
    """PyAV, or an error that says how to get it."""
    try:
        import av
    except ImportError:
        raise PromptsegError("video input needs PyAV: pip install 'promptseg[video]'") from None
    return av


def _av_errors(av) -> tuple[type[BaseException], ...]:
    return tuple(e for e in (getattr(av, "FFmpegError", None), getattr(getattr(av, "error", None), "FFmpegError", None))
                 if e is not None) or (OSError,)


class VideoSource:
    """One video file, stream URL or camera, decoded in order by PyAV. Packets that fail to decode are
    counted (``failed_frames``) and skipped; the run goes on."""

    kind = "video"

    def __init__(self, url: str, model_hw: tuple[int, int], keep_full: bool, max_frames: int | None = None):
        self.url, self.model_hw, self.keep_full, self.max_frames = url, model_hw, keep_full, max_frames
        av = import_av()
        self._errors = _av_errors(av)
        if not (_STREAM_URL.match(url) or _CAMERA.match(url)) and not Path(url).is_file():
            raise PromptsegError(f"{url}: video file not found")
        options = {"format": "v4l2"} if _CAMERA.match(url) else {}
        try:
            self._container = av.open(url, mode="r", timeout=10.0, **options)
        except self._errors as exc:
            raise PromptsegError(f"{url}: PyAV cannot open it ({exc})") from None
        if not self._container.streams.video:
            self._container.close()
            raise PromptsegError(f"{url}: no video stream | expected a video file, stream or camera")
        self._stream = self._container.streams.video[0]
        # slice threads only: frame threading holds several decoded 1080p frames per thread (measured:
        # overlay run 297 -> 278 MB peak RSS, and faster, since infer's own threads keep the cores busy)
        self._stream.thread_type = "SLICE"
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 30.0
        self.time_base = self._stream.time_base
        self.size_wh = (self._stream.codec_context.width, self._stream.codec_context.height)
        frames = self._stream.frames or 0
        self.expected_frames = min(frames, max_frames) if frames and max_frames else (frames or max_frames)
        self.failed_frames: list[int] = []  # positions (in decode order) of packets that failed
        self.stem = Path(url).stem if Path(url).suffix else re.sub(r"\W+", "_", url).strip("_") or "stream"

    def close(self) -> None:
        self._container.close()

    def _reduced_rgb(self, av_frame) -> np.ndarray:
        """RGB at the largest power-of-2 reduction keeping :func:`decode_size` (FFmpeg's area scaling, what
        a JPEG's DCT scaling gives an image), converted from YUV only at that size."""
        need_w, need_h = decode_size(self.model_hw)
        scale = 1
        while scale < 8 and av_frame.width // (2 * scale) >= need_w and av_frame.height // (2 * scale) >= need_h:
            scale *= 2
        return av_frame.to_ndarray(width=av_frame.width // scale, height=av_frame.height // scale, format="rgb24",
                                   interpolation="AREA")

    def frames(self) -> Iterator[Frame]:
        """Decoded frames in order, at most ``max_frames``."""
        count, position = 0, 0
        packets = self._container.demux(self._stream)
        while self.max_frames is None or count < self.max_frames:
            tick = perf_counter()
            try:
                packet = next(packets)
                decoded = packet.decode()
            except StopIteration:
                return
            except self._errors:
                self.failed_frames.append(position)
                position += 1
                continue
            for av_frame in decoded:
                if self.max_frames is not None and count >= self.max_frames:
                    return
                frame = Frame(count, f"{self.stem}_{count:06d}", f"{self.url} frame {count}",
                              size_wh=(av_frame.width, av_frame.height))
                frame.model_input = to_model_size(self._reduced_rgb(av_frame), self.model_hw)
                if self.keep_full:  # even sides: the planes as decoded, tinted and encoded without RGB
                    even = av_frame.width % 2 == 0 and av_frame.height % 2 == 0
                    frame.full = av_frame.to_ndarray(format="yuv420p") if even else av_frame.to_image()
                frame.ms["decode"] = (perf_counter() - tick) * 1e3  # demux + decode + conversions
                frame.ms["pre"] = 0.0  # the reduction and sampling are counted in decode
                count += 1
                position += 1
                yield frame
                tick = perf_counter()
