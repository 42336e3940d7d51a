from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptseg.errors import ConfigError
from promptseg.train.cam_train import CamTrainer
from promptseg.train.config import CamTrainConfig
from promptseg.train.distributed import setup

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """torchrun as this interpreter's module: it runs wherever torch is installed, PATH or not."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_two_gloo_processes_train_one_model(tiny_world, tiny_clip, baseline_run, tmp_path):
    """POLE: DDP owns the CAM network; the adaptors are broadcast and all-reduced by promptseg."""
    out = tmp_path / "pole"
    done = _torchrun([str(tiny_world), str(out), "pole", str(tiny_clip), str(baseline_run)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]  # DDP (and POLE's all-reduced adaptors) kept them equal
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["device"] == "cpu"
    assert 0 <= report["cam_miou"] <= 100
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]  # written once, by rank 0


def test_bf16_autocast_and_channels_last_train_on_cpu(tiny_world, tmp_path):
    cfg = CamTrainConfig(data=str(tiny_world), out=str(tmp_path), epochs=1, batch_size=16, cam_scales=(1.0,),
                         val_split=None, amp=True, channels_last=True, threads=1)
    trainer = CamTrainer(cfg)
    report = trainer.train(show_progress=False)
    assert report["amp"] == "bfloat16"
    assert trainer.net.classifier.weight.dtype == torch.float32  # autocast keeps fp32 master weights
    assert trainer.net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert 0 < log["cls"] < 10


def test_cuda_asked_without_a_gpu_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        setup("cuda", amp=False, channels_last=False)


def test_global_batch_must_split_over_processes(tiny_world, tmp_path, monkeypatch):
    import promptseg.train.cam_train as cam_train
    from promptseg.train.distributed import Runtime

    monkeypatch.setattr(cam_train, "setup", lambda *a: Runtime(torch.device("cpu"), rank=0, world_size=3))
    cfg = CamTrainConfig(data=str(tiny_world), out=str(tmp_path), epochs=1, batch_size=16, val_split=None)
    with pytest.raises(Exception, match="does not split over 3 processes"):
        CamTrainer(cfg).train(show_progress=False)
