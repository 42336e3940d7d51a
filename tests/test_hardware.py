from __future__ import annotations

import numpy as np
import pytest
import torch

from promptseg.data.cache import DecodedCache
from promptseg.train import hardware
from promptseg.train.cam_net import CamNet, CamNetConfig
from promptseg.train.cams import infer_cams


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_amp_follows_the_cpus_bf16_units(monkeypatch, has_bf16):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
    cpu = torch.device("cpu")
    assert hardware.resolve_amp(None, cpu) == (torch.bfloat16 if has_bf16 else None)
    assert hardware.resolve_amp(False, cpu) is None  # --no-amp: fp32 everywhere
    assert hardware.resolve_amp(True, cpu) == torch.bfloat16  # asked for: honoured
    facts = hardware.precision_facts(hardware.resolve_amp(None, cpu), True)
    assert facts["amp"] == ("bfloat16" if has_bf16 else "fp32") and facts["cpu_bf16_units"] is has_bf16


def test_channels_last_is_on_unless_turned_off():
    assert hardware.resolve_channels_last(None) is True and hardware.resolve_channels_last(False) is False
    x = torch.zeros(2, 3, 4, 5)
    assert hardware.to_memory_format(x, True).is_contiguous(memory_format=torch.channels_last)
    assert hardware.to_memory_format(x, False).is_contiguous()


def test_flop_count_and_throughput_are_exact_for_a_linear_layer():
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(10, 64)
    out, flops = hardware.count_flops(lambda: layer(x))
    assert out.shape == (10, 32) and flops == 2 * 10 * 64 * 32
    meter = hardware.Throughput(images=0, flops=0.0, seconds=2.0)
    meter.add(10, flops)
    meter.add(30, 3 * flops)
    assert meter.report() == {"images_per_s": 20.0, "gflops_per_s": round(4 * flops / 2.0 / 1e9, 2),
                              "gflop_per_image": round(4 * flops / 40 / 1e9, 4)}


def test_matmul_peak_is_measured():
    peaks = hardware.machine_peaks()
    assert peaks["fp32"] > 1.0  # GFLOP/s; any machine that runs the suite does more
    assert ("bf16" in peaks) is hardware.cpu_has_bf16()


def test_channels_last_cams_equal_the_contiguous_ones_and_count_their_flops():
    torch.manual_seed(0)
    net = CamNet(CamNetConfig(), 3).eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    labels = np.array([[1, 0, 1], [0, 1, 0]])
    plain = infer_cams(net, images, labels, scales=(1.0, 0.5), channels_last=False)
    meter = hardware.Throughput()
    nhwc = infer_cams(net, images, labels, scales=(1.0, 0.5), channels_last=True, throughput=meter)
    np.testing.assert_allclose(nhwc, plain, atol=1e-5)
    assert (plain[0, 1] == 0).all() and plain[0, 0].max() == pytest.approx(1.0)
    _, one_pass = hardware.count_flops(lambda: net(torch.zeros(4, 3, 40, 48)))  # batch 2 + flips, scale 1
    _, half = hardware.count_flops(lambda: net(torch.zeros(4, 3, 20, 24)))
    assert meter.images == 2 and meter.flops == one_pass + half


def test_decoded_cache_keeps_within_its_budget_and_hands_out_read_only_arrays():
    cache = DecodedCache(budget_bytes=250)
    loads = []

    def load(n):
        def run():
            loads.append(n)
            return np.zeros(100, np.uint8)
        return run

    first = cache.get("a", load("a"))
    assert cache.get("a", load("a")) is first and loads == ["a"]  # decoded once
    cache.get("b", load("b"))
    cache.get("c", load("c"))  # over budget: returned but not kept
    cache.get("c", load("c"))
    assert loads == ["a", "b", "c", "c"] and len(cache) == 2 and cache.bytes == 200
    with pytest.raises(ValueError):
        first[0] = 1


@pytest.mark.parametrize("groups", [1, 4, 32])
def test_a_convolutions_training_flops_are_three_forwards_whatever_its_groups(groups):
    conv = torch.nn.Conv2d(32, 64, 3, padding=1, stride=2, groups=groups, bias=False)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    _, forward = hardware.count_flops(lambda: conv(x))
    _, step = hardware.count_flops(lambda: conv(x).sum().backward())
    assert forward == 2 * 2 * 8 * 8 * 64 * (32 // groups) * 9
    assert step == 3 * forward  # forward + grad_input + grad_weight
