"""The overlay video ``infer`` writes for a video input: H.264 (libx264, else MPEG-4 Part 2) in MP4,
one output frame per input frame, at the source's frame rate, written to a temporary name and
renamed into place when complete (an interrupted run leaves no half-written video behind)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from .sources import import_av

CODECS = ("libx264", "h264", "mpeg4")  # the first this PyAV build can encode


class VideoWriter:
    """Frames (RGB Pillow images of the source's size) in, ``path`` out on :meth:`close`.

    yuv420p needs even sides: an odd last row or column is dropped."""

    def __init__(self, path: str | os.PathLike, fps: float, size_wh: tuple[int, int]):
        av = import_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self.frames = 0
        codec = next((c for c in CODECS if c in av.codecs_available), None)
        if codec is None:
            from ..errors import PromptsegError

            raise PromptsegError(f"this PyAV build has no video encoder of {', '.join(CODECS)}")
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(30)
        self._stream = self._container.add_stream(codec, rate=rate)
        self.size_wh = (size_wh[0] - size_wh[0] % 2, size_wh[1] - size_wh[1] % 2)
        self._stream.width, self._stream.height = self.size_wh
        self._stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # no lookahead or B-frames: frames leave as they come, and x264 holds no queue of 1080p frames;
            # ultrafast: 16 ms CPU per 1080p frame here against veryfast's 28, for 1.6x the bytes
            self._stream.options = {"preset": "ultrafast", "crf": "23", "tune": "zerolatency"}
        self._frame_type = av.VideoFrame

    def write(self, image: Image.Image | np.ndarray) -> None:
        """One frame: an RGB image, or ``yuv420p`` planes (``H*3/2 x W`` uint8) of even sides."""
        if isinstance(image, np.ndarray):
            frame = self._frame_type.from_ndarray(image, format="yuv420p")
        else:
            if image.size != self.size_wh:
                image = image.crop((0, 0, *self.size_wh))
            frame = self._frame_type.from_image(image)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> Path:
        """Flush the encoder and move the finished video into place."""
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished video (an error stopped the run)."""
        try:
            self._container.close()
        finally:
            self._tmp.unlink(missing_ok=True)
