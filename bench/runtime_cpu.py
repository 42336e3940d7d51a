"""Issue-6 benchmark record: the exported demo segmenter(s) through ONNX Runtime on this CPU.

Runs ``promptseg.runtime.bench`` (one fresh subprocess per model and batch: cold start and peak RSS
are the device's, not this script's) and writes ``bench/results/runtime_cpu.{json,md,png}`` with
the latency table, the acceptance checks (cold start <= 1 s, peak RSS <= 250 MB at batch 1) and,
with ``--data``, each model's mIoU and label agreement against the first (the FP32 one).

    python bench/runtime_cpu.py                       # runs/demo/export/segmenter.onnx and its INT8 siblings
    python bench/runtime_cpu.py A.onnx B.onnx --batch 1 8 --iters 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

from promptseg.io import write_json_atomic, write_text_atomic
from promptseg.runtime.backends import BackendOptions
from promptseg.runtime.bench import BenchConfig, format_table, host_info, plot_rows, run_bench
from promptseg.runtime.compare import CompareConfig, compare_models

RESULTS = Path(__file__).with_name("results")
DEFAULT_EXPORT = Path("runs/demo/export")
DEFAULT_DATA = Path("runs/demo/data")
COLD_START_S, PEAK_RSS_MB = 1.0, 250.0


def default_models() -> list[str]:
    """The demo's FP32 segmenter and the quantized ``segmenter.<target>.onnx`` files beside it."""
    fp32 = DEFAULT_EXPORT / "segmenter.onnx"
    return [str(p) for p in (fp32, *sorted(DEFAULT_EXPORT.glob("segmenter.*.onnx"))) if p.is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="ONNX files (default: the demo export's segmenters)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--name", default="runtime_cpu", help="results file stem under bench/results/")
    parser.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None,
                        help="VOC-layout data to compare every model with the first on (default: the demo world)")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    models = args.models or default_models()
    if not models:
        parser.error(f"no models given and none in {DEFAULT_EXPORT} (run `promptseg export` first)")

    cfg = BenchConfig(models=tuple(models), batches=tuple(args.batch), warmup=args.warmup, iters=args.iters,
                      options=BackendOptions(threads=args.threads))
    rows = run_bench(cfg)
    checks = {f"{Path(r['model']).name} batch {r['batch']}": {
        "cold_start_s": r["cold_start_s"], "cold_start_ok": r["cold_start_s"] <= COLD_START_S,
        "peak_rss_mb": r["peak_rss_mb"], "peak_rss_ok": r["peak_rss_mb"] <= PEAK_RSS_MB}
        for r in rows if r["batch"] == 1}
    comparisons = [compare_models(CompareConfig(model_a=models[0], model_b=m, data=args.data, split=args.split))
                   for m in models[1:]] if args.data else []
    host = host_info()
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", {"host": host, "config": cfg, "rows": rows, "checks": checks,
                                                      "comparisons": comparisons})
    plot_rows(rows, RESULTS / f"{args.name}.png")
    lines = [f"# Runtime on CPU: ONNX Runtime {host['onnxruntime']}, {host['cpu_count']} cores "
             f"({host['processor']}), Python {host['python']}", "",
             f"{args.warmup} warm-up and {args.iters} timed iterations per row, random images at the model's input "
             "size; latency is inference only, pre (stacking uint8 images into the float input) and post (palette "
             "PNGs of the labels) are host time per batch; cold start is imports + session in a fresh process; "
             "throughput in images/s.", "",
             f"Load average (1/5/15 min) at the end: {host['load_average_1_5_15']}", "",
             *[f"- `{m}`: {next(r['precision'] for r in rows if r['model'] == m)}" for m in models], "",
             format_table(rows), "",
             f"Acceptance at batch 1 (cold start <= {COLD_START_S:g} s, peak RSS <= {PEAK_RSS_MB:g} MB):", ""]
    for name, c in checks.items():
        lines.append(f"- {name}: cold start {c['cold_start_s']:.2f} s {'ok' if c['cold_start_ok'] else 'OVER'}, "
                     f"peak RSS {c['peak_rss_mb']:.0f} MB {'ok' if c['peak_rss_ok'] else 'OVER'}")
    if comparisons:
        lines += ["", f"Against `{models[0]}` on {args.data} ({args.split}, {comparisons[0]['images']} images):", "",
                  "| model | mIoU | its mIoU - first's | label agreement | max abs logit diff |",
                  "| --- | ---: | ---: | ---: | ---: |",
                  f"| {Path(models[0]).name} | {100 * comparisons[0]['model_a']['miou']:.1f} | | | |"]
        lines += [f"| {Path(c['model_b']['path']).name} | {100 * c['model_b']['miou']:.1f} | "
                  f"{100 * c['miou_delta']:+.1f} | {100 * c['label_agreement']:.2f}% | "
                  f"{c['logits']['max_abs_diff']:.3g} |" for c in comparisons]
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
