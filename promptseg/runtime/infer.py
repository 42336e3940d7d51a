"""``promptseg infer``: masks (and overlays) for image files or a video, on any backend, with the
host work overlapped so the graph sets the pace.

Each frame is decoded at the resolution the network needs (a JPEG at a reduced DCT scale, a video
frame converted straight to the network's size), resized once, batched through the runner, and its
labels are brought to the frame's own size by :func:`~.processing.upsample_labels` (the argmax of
the bilinearly resized logits, interpolated only where labels meet). Masks are palette PNGs;
overlays are JPEGs (PNG on request) or, for a video, one overlay video with the same frame count.

Three kinds of work run at once, in a bounded pipeline that keeps frame order: decoding (worker
threads for files, one reader thread for a video), the graph (this thread), and label upsampling +
encoding (worker threads, written out in order by one sink thread). Queues between them are
bounded, so memory stays flat for any number of frames. Pillow, numpy, PyAV and the backends
release the GIL in their C code, so threads give real parallelism.

A file or frame that cannot be used is reported (by name and reason in ``summary.json``) and the
others are still processed; the caller turns "some failed" into the exit code.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import perf_counter

import numpy as np

from ..errors import PromptsegError
from ..io import atomic_write, write_bytes_atomic, write_json_atomic
from .backends import BACKENDS, BackendOptions, open_runner
from .processing import (
    encode_mask_png,
    present_classes,
    stack_batch,
    tint_in_place,
    tint_yuv420_in_place,
    upsample_labels,
)
from .sources import Frame, ImageFiles, VideoSource, collect_inputs, is_video
from .spec import OVERLAY_FORMATS
from .video import VideoWriter

DEFAULT_MAX_PIXELS = 40_000_000  # a 40 MP photo decodes to 120 MB of RGB: the most a Jetson should take
STAGES = ("decode", "pre", "graph", "post", "encode")


@dataclass(frozen=True)
class InferConfig:
    model: str
    inputs: tuple[str, ...]
    out: str
    backend: str = "onnxruntime"
    batch: int = 1
    overlay: bool = False
    overlay_format: str = "jpeg"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_frames: int | None = None  # video: stop after this many frames
    workers: int | None = None  # host threads for decoding and encoding; None: the CPU count (at most 4)
    options: BackendOptions = field(default_factory=BackendOptions)

    def validate(self) -> InferConfig:
        if not self.inputs:
            raise PromptsegError("inputs: got none | expected image files, folders or one video")
        videos = [i for i in self.inputs if is_video(str(i))]
        if videos and len(self.inputs) > 1:
            raise PromptsegError(f"inputs: got {len(self.inputs)} inputs with the video {videos[0]} | expected one "
                                 f"video, stream or camera per run, or image files and folders")
        if self.backend not in BACKENDS:
            raise PromptsegError(f"backend: got {self.backend!r} | expected one of {', '.join(BACKENDS)}")
        if self.batch < 1:
            raise PromptsegError(f"batch: got {self.batch} | expected >= 1")
        if self.overlay_format not in OVERLAY_FORMATS:
            raise PromptsegError(f"overlay_format: got {self.overlay_format!r} | expected one of "
                                 f"{', '.join(OVERLAY_FORMATS)}")
        if self.max_pixels < 1:
            raise PromptsegError(f"max_pixels: got {self.max_pixels} | expected >= 1")
        if self.max_frames is not None and self.max_frames < 1:
            raise PromptsegError(f"max_frames: got {self.max_frames} | expected >= 1")
        if self.workers is not None and self.workers < 1:
            raise PromptsegError(f"workers: got {self.workers} | expected >= 1")
        self.options.validate()
        return self

    @property
    def video_input(self) -> str | None:
        return str(self.inputs[0]) if is_video(str(self.inputs[0])) else None

    @property
    def host_workers(self) -> int:
        return self.workers or min(4, os.cpu_count() or 1)


def timing_summary(per_frame: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """p50/p90/mean milliseconds of each host stage over the frames that went through it."""
    summary = {}
    for stage, values in per_frame.items():
        if values:
            p50, p90 = np.percentile(values, [50, 90])
            summary[stage] = {"p50": round(float(p50), 3), "p90": round(float(p90), 3),
                              "mean": round(float(np.mean(values)), 3)}
    return summary


class _Sink:
    """Takes the futures of finished frames in input order on its own thread: records them, feeds the
    overlay video, reports progress. The queue bounds how many frames are in flight."""

    def __init__(self, depth: int, handle: Callable[[Frame, dict, object], None]):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._handle = handle
        self._thread = threading.Thread(target=self._run, name="promptseg-infer-sink", daemon=True)
        self._thread.start()

    def put(self, frame: Frame, result: Future | None) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((frame, result))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure
            frame, result = item
            try:
                record, extra = result.result() if result is not None else ({}, None)
                self._handle(frame, record, extra)
            except BaseException as exc:  # re-raised in the main thread
                self.error = exc

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


def _ordered(pool: ThreadPoolExecutor, source: ImageFiles, ahead: int) -> Iterator[Frame]:
    """``source.load(i)`` for every index in order, at most ``ahead`` decoding at once."""
    pending: deque[Future] = deque()
    for index in range(len(source)):
        pending.append(pool.submit(source.load, index))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _read_ahead(frames: Iterator[Frame], depth: int) -> Iterator[Frame]:
    """A reader thread that runs ``frames`` ahead of the consumer, at most ``depth`` frames."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done, failure = object(), []
    stop = threading.Event()

    def read() -> None:
        try:
            for frame in frames:
                while not stop.is_set():
                    try:
                        buffer.put(frame, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:
            failure.append(exc)
        buffer.put(done)

    thread = threading.Thread(target=read, name="promptseg-infer-reader", daemon=True)
    thread.start()
    try:
        while (frame := buffer.get()) is not done:
            yield frame
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


def _batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Outputs:
    """Where a frame's results go: its mask PNG, its overlay (a file, or a frame of the overlay video)."""

    def __init__(self, cfg: InferConfig, meta, video: VideoWriter | None):
        self.out, self.meta, self.cfg, self.video = Path(cfg.out), meta, cfg, video
        (self.out / "masks").mkdir(parents=True, exist_ok=True)
        if cfg.overlay and video is None:
            (self.out / "overlays").mkdir(parents=True, exist_ok=True)

    def finish(self, frame: Frame, logits: np.ndarray) -> tuple[dict, object]:
        """Labels at the frame's size, the mask written, the overlay composed (and written, for files)."""
        tick = perf_counter()
        width, height = frame.size_wh
        labels = upsample_labels(logits, (height, width))
        overlay = None
        if self.cfg.overlay:  # a video frame comes as its yuv420p planes, an image as RGB
            tint = tint_yuv420_in_place if isinstance(frame.full, np.ndarray) else tint_in_place
            overlay = tint(frame.full, labels, self.meta.palette)
        frame.full = None
        frame.ms["post"] = (perf_counter() - tick) * 1e3
        tick = perf_counter()
        mask_path = self.out / "masks" / f"{frame.name}.png"
        write_bytes_atomic(mask_path, encode_mask_png(labels, self.meta.palette))
        record = {"mask": str(mask_path), "size_wh": [width, height],
                  "classes": present_classes(labels, self.meta.class_names)}
        if overlay is not None and self.video is None:
            suffix = "jpg" if self.cfg.overlay_format == "jpeg" else "png"
            path = self.out / "overlays" / f"{frame.name}.{suffix}"
            options = {"format": "JPEG", "quality": 90} if suffix == "jpg" else {"format": "PNG", "compress_level": 1}
            atomic_write(path, lambda tmp: overlay.save(tmp, **options))
            record["overlay"] = str(path)
            overlay = None
        frame.ms["encode"] = (perf_counter() - tick) * 1e3
        return record, overlay


def run_infer(cfg: InferConfig, progress: Callable[[int], None] | None = None,
              on_total: Callable[[int | None], None] | None = None) -> dict:
    """Masks into ``out/masks``, overlays into ``out/overlays`` (or ``out/overlay.mp4`` for a video),
    ``out/summary.json``; returns the summary.

    ``summary["failed"]`` counts the files or decoded frames that got no mask (a video's undecodable
    packets are skipped and counted apart, in ``video.failed_to_decode``); ``timing_ms`` gives each host
    stage's p50/p90 per frame and ``frames_per_s`` the rate of the whole run. ``on_total`` hears
    the number of frames to come once the input is open (None for a stream of unknown length);
    ``progress`` hears every finished frame.
    """
    cfg.validate()
    out = Path(cfg.out)
    # the graph gets half the cores unless told otherwise: the host threads decode and encode on the rest
    # (1080p frames, 64 px demo model, 2 cores: 41 frames/s with one ONNX Runtime thread, 31 with two)
    options = replace(cfg.options, max_batch=max(cfg.options.max_batch, cfg.batch),
                      threads=cfg.options.threads or max(1, (os.cpu_count() or 1) // 2))
    per_frame: dict[str, list[float]] = {stage: [] for stage in STAGES}
    records: dict[int, dict] = {}
    failed_reasons: list[str] = []
    with open_runner(cfg.model, cfg.backend, options) as runner:
        meta = runner.metadata
        if meta.kind != "segmenter":
            raise PromptsegError(f"{cfg.model}: a {meta.kind} model | expected a segmenter (logits, labels)")
        model_hw = tuple(meta.input_size)
        video_url = cfg.video_input
        if video_url:
            source = VideoSource(video_url, model_hw, cfg.overlay, cfg.max_frames)
            video = VideoWriter(out / "overlay.mp4", source.fps, source.size_wh) if cfg.overlay else None
        else:
            source = ImageFiles(collect_inputs(cfg.inputs), model_hw, cfg.overlay, cfg.max_pixels)
            video = None
        outputs = _Outputs(cfg, meta, video)
        started = perf_counter()  # frames/s of the frames, not of loading the model
        if on_total is not None:
            on_total(len(source) if source.kind == "images" else source.expected_frames)

        def handle(frame: Frame, record: dict, overlay) -> None:
            if overlay is not None:
                tick = perf_counter()
                video.write(overlay)
                frame.ms["encode"] += (perf_counter() - tick) * 1e3
            if frame.reason is not None:
                failed_reasons.append(frame.reason)
            else:
                for stage in STAGES:
                    per_frame[stage].append(frame.ms.get(stage, 0.0))
            if source.kind == "images":
                records[frame.index] = {"file": frame.source, "ok": frame.reason is None,
                                        **({"reason": frame.reason} if frame.reason else {}), **record,
                                        **({"model_size_wh": [model_hw[1], model_hw[0]],
                                            "ms": {k: round(v, 3) for k, v in frame.ms.items()}}
                                           if frame.reason is None else {})}
            if progress is not None:
                progress(1)

        workers = cfg.host_workers
        # frames in flight: the batch being filled, plus a few decoding ahead and a few between the graph
        # and the sink; both few = workers + 1, enough to keep every worker busy whatever the batch
        # (a deeper queue only holds more 1080p frames: 280 MB at batch 8 with overlays, when it was batch + workers)
        depth = workers + 1
        graph_seconds = 0.0
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="promptseg-infer") as pool:
                frames = _ordered(pool, source, depth) if source.kind == "images" else \
                    _read_ahead(source.frames(), depth)  # one reader thread, decoding while the batch fills
                sink = _Sink(depth, handle)
                try:
                    for batch in _batches(frames, cfg.batch):
                        ready = [f for f in batch if f.reason is None]
                        for frame in batch:
                            if frame.reason is not None:
                                sink.put(frame, None)
                        if not ready:
                            continue
                        tick = perf_counter()
                        feed = stack_batch([f.model_input for f in ready])
                        stacked = perf_counter()
                        try:
                            logits = runner.infer({"image": feed})["logits"]
                        except PromptsegError as exc:  # this batch fails (named per frame); the others still run
                            for frame in ready:
                                frame.reason = f"{frame.source}: {exc}"
                                sink.put(frame, None)
                            continue
                        ran = perf_counter()
                        graph_seconds += ran - stacked
                        for k, frame in enumerate(ready):
                            frame.model_input = None
                            frame.ms["pre"] = frame.ms.get("pre", 0.0) + (stacked - tick) * 1e3 / len(ready)
                            frame.ms["graph"] = (ran - stacked) * 1e3 / len(ready)
                            sink.put(frame, pool.submit(outputs.finish, frame, logits[k]))
                finally:
                    sink.close()
        except BaseException:
            if video is not None:
                video.abort()
            raise
        finally:
            if video_url:
                source.close()
        if video is not None:
            video.close()
        precision, precision_note = runner.precision, runner.precision_note
    seconds = perf_counter() - started
    succeeded = len(per_frame["graph"])
    summary = {"model": str(cfg.model), "backend": cfg.backend, "precision": precision,
               "precision_note": precision_note, "input": source.kind,
               "batch": cfg.batch, "workers": workers, "overlay": cfg.overlay,
               "succeeded": succeeded, "failed": len(failed_reasons), "seconds": round(seconds, 4),
               "inference_seconds": round(graph_seconds, 4),
               "frames_per_s": round(succeeded / seconds, 3) if seconds > 0 else None,
               "timing_ms": timing_summary(per_frame)}
    if source.kind == "images":
        summary["images"] = len(source)
        summary["files"] = [records[i] for i in range(len(source))]
    else:
        summary["video"] = {"source": video_url, "fps": source.fps, "size_wh": list(source.size_wh),
                            "frames": succeeded + len(failed_reasons) + len(source.failed_frames),
                            # packets FFmpeg could not decode: skipped, counted, not failures of the run
                            "failed_to_decode": len(source.failed_frames),
                            "failed_positions": source.failed_frames[:1000],
                            "overlay": str(out / "overlay.mp4") if video is not None else None,
                            "per_frame_ms": {k: [round(v, 3) for v in vals] for k, vals in per_frame.items()}}
        summary["reasons"] = failed_reasons[:1000]
    write_json_atomic(out / "summary.json", summary)
    return summary
