"""Training throughput of the CLIMS step at paper sizes: fp32 eager vs the fast path.

The step of :class:`promptseg.train.methods.ClipGuidedTrainer`: a ResNet-50 CAM network (output
stride 16) on 512 px crops, sigmoid class maps masking each (image, present class) into a
foreground and a background view, one pass of a frozen ViT-B-32 CLIP (224 px) over all views,
L_OTM + L_BTM + L_CBS + L_REG, backward into the CAM network. Random weights (nothing is
downloaded), random images, 2 present classes per image as VOC averages about 1.5.

Variants: ``fp32`` (eager, TF32 off), ``fast`` (bf16 autocast + channels_last + TF32), and
``fast+compile`` (plus torch.compile of both networks). MFU = model FLOPs per step (counted with
torch's FlopCounterMode on the fp32 step) / step time / the GPU's dense bf16 peak.

    python bench/train_step.py --device cuda                  # paper sizes, writes bench/results/
    python bench/train_step.py --device cpu --crop 64 --clip-size 32 --batch 4 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from promptseg.train import losses
from promptseg.train.cam_net import CamNet, CamNetConfig
from promptseg.train.cams import imagenet_normalise
from promptseg.train.clip import clip_normalize

RESULTS = Path(__file__).with_name("results")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense, SXM where it varies


def build(args, device):
    import open_clip

    net = CamNet(CamNetConfig(arch=args.arch, stages=4, output_stride=16), num_classes=20).to(device)
    clip = open_clip.create_model(args.clip_model, pretrained=None, force_image_size=args.clip_size).to(device)
    clip.eval().requires_grad_(False)
    text = F.normalize(torch.randn(20, clip.visual.output_dim, device=device), dim=-1)
    backgrounds = F.normalize(torch.randn(10, clip.visual.output_dim, device=device), dim=-1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    return net, clip, text, backgrounds, optimizer


def make_step(net, clip, text, backgrounds, optimizer, args, autocast_dtype, channels_last):
    def forward(images01, labels):
        cams = net(imagenet_normalise(images01))
        maps = torch.sigmoid(cams)
        x = clip_normalize(images01, args.clip_size)
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
        b_idx, k_idx = torch.nonzero(labels > 0, as_tuple=True)
        p = maps[b_idx, k_idx][:, None]
        views = torch.cat([p * x[b_idx], (1 - p) * x[b_idx]])
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        feats = F.normalize(clip.encode_image(views).float(), dim=-1)
        fg, bg = feats[: len(b_idx)], feats[len(b_idx):]
        t = text[k_idx]
        return (10 * losses.object_text_matching(fg, t) + 24 * losses.background_text_matching(bg, t)
                + losses.class_background_suppression(fg, backgrounds, 0.26) + 0.2 * losses.area_regularisation(maps))

    def step(images01, labels):
        ctx = torch.autocast(images01.device.type, dtype=autocast_dtype) if autocast_dtype else _null()
        with ctx:
            loss = forward(images01, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_variant(name, args, device) -> dict:
    fast = name != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net, clip, text, backgrounds, optimizer = build(args, device)
    memory_format = torch.channels_last if fast else torch.contiguous_format
    net.to(memory_format=memory_format)
    clip.to(memory_format=memory_format)
    if name == "fast+compile":
        net.forward = torch.compile(net.forward)
        clip.encode_image = torch.compile(clip.encode_image)
    dtype = (torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16) \
        if fast else None
    step = make_step(net, clip, text, backgrounds, optimizer, args, dtype, fast)
    images = torch.rand(args.batch, 3, args.crop, args.crop, device=device).contiguous(memory_format=memory_format)
    labels = torch.zeros(args.batch, 20, device=device)
    labels[:, :2] = 1

    flops = None
    if name == "fp32":
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(images, labels)
        flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step(images, labels)
    _sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step(images, labels)
    _sync(device)
    seconds = (time.perf_counter() - started) / args.steps
    return {"variant": name, "step_ms": round(1000 * seconds, 2), "images_per_s": round(args.batch / seconds, 1),
            "loss": loss.detach().item(), "flops_per_step": flops}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--clip-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=["fp32", "fast", "fast+compile"])
    parser.add_argument("--out", default=None,
                        help="JSON results file [default: bench/results/train_step_<device>.json]")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = [run_variant(name, args, device) for name in args.variants]
    flops = next((r["flops_per_step"] for r in rows if r["flops_per_step"]), None)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_first"] = round(row["images_per_s"] / base, 2)
        if flops and peak:
            row["mfu_bf16_peak"] = round(flops / (row["step_ms"] / 1000) / (peak * 1e12), 4)
    result = {"device": gpu, "torch": torch.__version__, "config": vars(args), "rows": rows}
    out = Path(args.out) if args.out else RESULTS / f"train_step_{device.type}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':<14} {'step ms':>9} {'img/s':>8} {'x':>6} {'MFU':>7}")
    for row in rows:
        print(f"{row['variant']:<14} {row['step_ms']:>9.1f} {row['images_per_s']:>8.1f} "
              f"{row['speedup_vs_first']:>6.2f} {row.get('mfu_bf16_peak', float('nan')):>7.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
