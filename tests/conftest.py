from __future__ import annotations

import os
from pathlib import Path

import pytest

import promptseg
from promptseg.data.synth import SynthConfig, write_world

# tests/test_planted_bugs.py runs guard tests over a planted copy of the package: it must be the one imported
_PLANTED = os.environ.get("PROMPTSEG_PLANTED_COPY")
if _PLANTED and not Path(promptseg.__file__).resolve().is_relative_to(Path(_PLANTED).resolve()):
    raise RuntimeError(f"planted copy {_PLANTED} not imported: promptseg is {promptseg.__file__}")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small synthetic world shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("world")
    write_world(root, SynthConfig(seed=3, train=96, val=32, clip_images=64))
    return root


@pytest.fixture(scope="session")
def tiny_clip(tiny_world, tmp_path_factory) -> Path:
    """A CLIP run directory trained for a few steps: enough for shapes and code paths."""
    from promptseg.train.clip import ClipTrainConfig, train_clip

    out = tmp_path_factory.mktemp("tiny_clip")
    train_clip(ClipTrainConfig(data=str(tiny_world), out=str(out), steps=3, batch_size=16, warmup_steps=1),
               show_progress=False)
    return out


@pytest.fixture(scope="session")
def baseline_run(tiny_world, tmp_path_factory) -> Path:
    from promptseg.train.cam_train import train_cam
    from promptseg.train.config import CamTrainConfig

    out = tmp_path_factory.mktemp("baseline")
    train_cam(CamTrainConfig(data=str(tiny_world), out=str(out), epochs=1, batch_size=16, cam_scales=(1.0,)),
              show_progress=False)
    return out


TINY_PIPELINE = dict(train_images=48, val_images=16, clip_images=32, clip_steps=2, pretrain_epochs=1, baseline_epochs=1,
                     method_epochs=1, seg_epochs=1, calibration_images=16, bench_batches=(1,), bench_iters=5,
                     threads=1, prebuilt=False)  # from scratch: the tiny CLIP and backbone train here


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A finished pipeline run at toy size (every stage, a few steps each), shared read-only."""
    from promptseg.pipeline import PipelineConfig, run_pipeline

    out = tmp_path_factory.mktemp("tiny_demo")
    run_pipeline(PipelineConfig(out=str(out), **TINY_PIPELINE), show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_demo) -> Path:
    """The export stage of :func:`tiny_demo` (SemPLeS)."""
    return tiny_demo / "export"


@pytest.fixture(scope="session")
def int8_segmenter(tiny_world, tmp_path_factory) -> Path:
    """A small segmenter.onnx that segments the tiny world for real (val mIoU ~67, foreground on ~7% of
    the pixels as in the ground truth) and quantises well: see tests/int8_models.py. Seconds to build."""
    from int8_models import build_segmenter

    return build_segmenter(tiny_world, tmp_path_factory.mktemp("int8_segmenter") / "segmenter.onnx")


@pytest.fixture(scope="session")
def int8_cam(tiny_world, tmp_path_factory) -> Path:
    """The CAM graph of the same features (cam.onnx, the run's threshold in its metadata)."""
    from int8_models import build_cam

    return build_cam(tiny_world, tmp_path_factory.mktemp("int8_cam") / "cam.onnx")
