"""When plain INT8 fails the gate: name the layer that breaks, repair it, measure every step.

The TensorRT target's steps, in this order (each one's drop on the gate is measured and recorded):

1. ``plain``: every layer INT8 with the run's ranges (the old behaviour); ``pinned`` when the user
   keeps layers float by hand (``--keep-float``);
2. ``equalisation``: cross-layer range equalisation of every ``Conv -> ReLU -> Conv`` pair
   (:mod:`.equalise`, exact in FP32), kept only when it lowers the drop;
3. ``tensor ranges``: for the activations of the most sensitive layers, the other calibration
   methods' ranges (percentile, entropy, min/max), tensor by tensor, each kept where it lowers the drop;
4. ``keep float``: the most sensitive layers left in float one at a time, in the order the gate ranks
   them, until the gate passes;
5. ``fewest changes``: each float layer and per-tensor range of steps 3-4 undone, latest first, where
   the gate still passes without it.

The first step that passes ends the repair, so a model that quantises well keeps every layer INT8.
The steps are chosen by their drop on the gate images themselves: the final drop is the gate's,
not an estimate on unseen images.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from ..errors import PromptsegError
from .config import CalibrationConfig, Method
from .equalise import MIN_IMBALANCE, equalise, find_pairs
from .gate import Gate, GateScore
from .images import ImageBatches, spread
from .quantize import Ranges, check_tensorrt_qdq, compute_ranges, quantization_record, quantize_tensorrt
from .sensitivity import ProxyImages, proxy_sensitivity, quantised_layers, with_float_layers
from .stats import TensorStats, collect

EXACT_TOLERANCE = 1e-3  # equalised FP32 output vs the original, relative to the output's peak (float rounding)


@dataclass(frozen=True)
class Recipe:
    """What makes a QDQ graph besides its calibration images: decisions, no numbers."""

    equalise: bool = False
    methods: tuple[tuple[str, str], ...] = ()  # (tensor, method) pairs, sorted
    keep_float: tuple[str, ...] = ()  # layers left float (pinned ones included)

    def with_method(self, tensor: str, method: Method) -> Recipe:
        methods = dict(self.methods)
        methods[tensor] = method.value
        return replace(self, methods=tuple(sorted(methods.items())))

    def record(self) -> dict:
        return {"equalised": self.equalise, "tensor_methods": dict(self.methods), "keep_float": list(self.keep_float)}


@dataclass
class Built:
    """One QDQ graph: the model, the FP32 graph it quantises, and what was done to it."""

    model: onnx.ModelProto
    source: onnx.ModelProto
    ranges: Ranges
    equalisation: list[dict]
    tensor_ranges: list[dict]
    qdq: dict


class Builder:
    """The TensorRT QDQ graph of a recipe from some calibration images; what a different set of
    float layers does not change (equalisation, ranges, quantisation) is built once and reused."""

    def __init__(self, fp32: onnx.ModelProto, cfg: CalibrationConfig, workdir: Path, record: dict):
        self.fp32 = fp32
        self.cfg = cfg
        self.workdir = workdir
        self.record = record
        self._ranges: dict[tuple, tuple[onnx.ModelProto, Path, Ranges, list[dict]]] = {}
        self._quantised: dict[tuple, tuple] = {}
        self._stats: dict[tuple, TensorStats] = {}
        self._amaxes: dict[tuple, float] = {}
        self._count = 0

    def _path(self, stem: str) -> Path:
        self._count += 1
        return self.workdir / f"{stem}-{self._count}.onnx"

    def source(self, calib: ImageBatches, equalised: bool) -> tuple[onnx.ModelProto, Path, Ranges, list[dict]]:
        """The FP32 graph to quantise (equalised on ``calib``'s channel ranges or not) and its ranges."""
        key = (tuple(calib.ids), equalised)
        if key not in self._ranges:
            model, records = copy.deepcopy(self.fp32), []
            if equalised:
                pairs = find_pairs(model)
                stats = collect(model, calib, [p.tensor for p in pairs], threads=self.cfg.threads)
                records = equalise(model, pairs, {name: s.channel_amax for name, s in stats.items()})
            path = self._path("source")
            onnx.save(model, str(path))
            ranges = compute_ranges(path, calib, self.cfg.method, self.cfg.percentile, True, self.workdir)
            self._ranges[key] = (model, path, ranges, records)
        return self._ranges[key]

    def _amax(self, calib: ImageBatches, equalised: bool, source: onnx.ModelProto, ranges: Ranges, tensor: str,
              method: str) -> float:
        """The symmetric range ``method`` gives ``tensor`` (histograms collected once per tensor)."""
        key = (tuple(calib.ids), equalised, tensor)
        if key not in self._stats:
            self._stats[key] = collect(source, calib, [tensor], hist_amax={tensor: ranges.amax(tensor)},
                                       threads=self.cfg.threads)[tensor]
        if (*key, method) not in self._amaxes:
            stat = self._stats[key]
            self._amaxes[(*key, method)] = (stat.percentile_amax(self.cfg.percentile)
                                            if method == Method.PERCENTILE.value
                                            else stat.entropy_amax() if method == Method.ENTROPY.value
                                            else max(abs(stat.low), abs(stat.high)))
        return self._amaxes[(*key, method)]

    def build(self, recipe: Recipe, calib: ImageBatches) -> Built:
        key = (tuple(calib.ids), recipe.equalise, recipe.methods)
        if key not in self._quantised:
            source, path, ranges, records = self.source(calib, recipe.equalise)
            tensor_ranges: list[dict] = []
            if recipe.methods:
                chosen = {tensor: self._amax(calib, recipe.equalise, source, ranges, tensor, method)
                          for tensor, method in recipe.methods}
                tensor_ranges = [{"tensor": tensor, "method": method, "amax_before": ranges.amax(tensor),
                                  "amax": chosen[tensor]} for tensor, method in recipe.methods]
                ranges = ranges.with_amax(chosen)
            cache = ranges.save_ort(self.workdir / f"ort_cache-{self._count}.json")
            model, summary = quantize_tensorrt(path, self._path("qdq"), cache, ranges, {})
            self._quantised[key] = (model, ranges, records, tensor_ranges, summary, source)
        model, ranges, records, tensor_ranges, summary, source = self._quantised[key]
        model = with_float_layers(model, source, recipe.keep_float)
        _set_extra(model, {"precision": "int8", "quantization": quantization_record(
            **self.record, **recipe.record(), num_images=len(calib.refs))})
        qdq = {**check_tensorrt_qdq(model, "the repaired QDQ graph"),
               "residual_adds_fused": summary["residual_adds_fused"]}
        return Built(model, source, ranges, records, tensor_ranges, qdq)


def _set_extra(model: onnx.ModelProto, extra: dict[str, str]) -> None:
    from ..runtime.spec import METADATA_PREFIX

    keys = {METADATA_PREFIX + "extra." + k for k in extra}
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in keys]
    del model.metadata_props[:]
    for key, value in keep + [(METADATA_PREFIX + "extra." + k, v) for k, v in extra.items()]:
        model.metadata_props.add(key=key, value=value)


@dataclass
class Step:
    name: str
    recipe: Recipe
    built: Built
    drop: float
    score: GateScore
    kept: bool
    detail: dict = field(default_factory=dict)

    def row(self, gate: Gate) -> dict:
        return {"step": self.name, "drop": round(self.drop, 3), "passed": gate.passes(self.score),
                "kept": self.kept, **self.detail}


class Repair:
    """The TensorRT target's sensitivity analysis and repair loop (see the module docstring)."""

    def __init__(self, builder: Builder, gate: Gate, calib: ImageBatches, proxy: ProxyImages, cfg: CalibrationConfig,
                 say: Callable[[str], None], input_name: str):
        self.builder, self.gate, self.calib, self.proxy, self.cfg = builder, gate, calib, proxy, cfg
        self.say, self.input_name = say, input_name
        self.steps: list[Step] = []

    def measure(self, recipe: Recipe, calib: ImageBatches | None = None) -> tuple[Built, float, GateScore]:
        built = self.builder.build(recipe, calib or self.calib)
        score = self.gate.score(built.model)
        return built, self.gate.drop(score), score

    def passes(self, score: GateScore) -> bool:
        return self.gate.passes(score)

    def _step(self, name: str, recipe: Recipe, kept: bool = True, **detail) -> Step:
        built, drop, score = self.measure(recipe)
        step = Step(name, recipe, built, drop, score, kept, detail)
        self.steps.append(step)
        self.say(f"  {name}: drop {drop:.2f}{'' if kept else ' (not kept)'}")
        return step

    @property
    def current(self) -> Step:
        return next(s for s in reversed(self.steps) if s.kept)

    def sensitivity(self, built: Built, what: str) -> dict:
        """Proxy for every layer, the gate for the top ``shortlist`` (float alone, quantised alone)."""
        layers = quantised_layers(built.model)
        self.say(f"sensitivity ({what}): proxy on {len(self.proxy.batch)} calibration images for {len(layers)} layers")
        everything, rows = proxy_sensitivity(built.model, built.source, self.proxy, self.gate.labeller,
                                             input_name=self.input_name, threads=self.cfg.threads)
        names = [r["layer"] for r in rows]
        for row in rows[:self.cfg.shortlist]:
            only_float = self.gate.drop(self.gate.score(with_float_layers(built.model, built.source, [row["layer"]])))
            others = [n for n in names if n != row["layer"]]
            only_quantised = self.gate.drop(self.gate.score(with_float_layers(built.model, built.source, others)))
            row["gate"] = {"only_float_drop": round(only_float, 3), "only_quantised_drop": round(only_quantised, 3)}
        for row in rows[self.cfg.shortlist:]:
            row["gate"] = None
        return {"of": what, "proxy": "SQNR (dB) of the float output "
                f"({self.gate.labeller.float_output}) and share of changed labels against FP32 on "
                f"{len(self.proxy.batch)} calibration images; ranked by the SQNR with only that layer quantised",
                "gate": f"the gate's drop (its metric) on the {self.cfg.shortlist} top-ranked layers",
                "all_quantised": everything, "layers": rows}

    def run(self) -> dict:
        """The repair; returns the report's ``sensitivity``/``repair`` parts (``self.steps`` holds the models)."""
        cfg = self.cfg
        plain = self._step("plain", Recipe(), kept=True, what="every layer INT8, the run's ranges")
        sensitivity = [self.sensitivity(plain.built, "plain INT8")]
        if cfg.keep_float:
            self._step("pinned", Recipe(keep_float=cfg.keep_float), layers=list(cfg.keep_float),
                       what="layers kept float by hand (--keep-float)")
        if cfg.repair and not self.passes(self.current.score):
            self._equalise()
            if self.current.name == "equalisation" and not self.passes(self.current.score):
                sensitivity.append(self.sensitivity(self.current.built, "after equalisation"))
            ranking = sensitivity[-1]["layers"]
            if not self.passes(self.current.score):
                self._tensor_ranges(ranking)
            if not self.passes(self.current.score):
                self._keep_float(ranking)
            if self.passes(self.current.score) and (set(self.current.recipe.keep_float) - set(cfg.keep_float)
                                                   or self.current.recipe.methods):
                self._fewest()
        final = self.current
        return {"sensitivity": sensitivity, "final": final,
                "culprit": _culprit(sensitivity[0]["layers"]),
                "repairs": self._repairs(final)}

    def _equalise(self) -> None:
        base = self.current
        pairs = find_pairs(self.builder.fp32)
        if not pairs:
            self.steps.append(Step("equalisation", base.recipe, base.built, base.drop, base.score, False,
                                   {"what": "no Conv -> ReLU -> Conv pair to equalise"}))
            return
        trial = replace(base.recipe, equalise=True)
        built, drop, score = self.measure(trial)
        diff = self.proxy.max_abs_diff(built.source, self.gate.labeller, self.input_name, self.cfg.threads)
        peak = float(np.abs(self.proxy.reference).max())
        if not diff <= EXACT_TOLERANCE * max(peak, 1.0):
            raise PromptsegError(f"equalisation changed the FP32 output by {diff:.3g} (output peak {peak:.3g}) | "
                                 f"expected an exact rewrite (<= {EXACT_TOLERANCE:g} relative)")
        rescaled = [r for r in built.equalisation if r["equalised"]]
        kept = bool(rescaled) and drop < base.drop
        self.steps.append(Step("equalisation", trial, built, drop, score, kept,
                               {"what": f"{len(rescaled)} of {len(pairs)} Conv -> ReLU -> Conv pairs rescaled per "
                                        f"channel (exact in FP32): those whose largest channel range is >= "
                                        f"{MIN_IMBALANCE:g}x the median",
                                "fp32_max_abs_diff": diff,
                                "pairs": sorted(built.equalisation, key=lambda r: -r["imbalance_before"])}))
        self.say(f"  equalisation: drop {drop:.2f}{'' if kept else ' (not kept)'}")

    def _tensor_ranges(self, ranking: list[dict]) -> None:
        base = self.current
        alternatives = [m for m in Method if m is not self.cfg.method]
        candidates = [(row["layer"], tensor, method) for row in ranking[:self.cfg.shortlist]
                      for tensor in row["activations"] for method in alternatives]
        recipe, (built, drop, score) = base.recipe, (base.built, base.drop, base.score)
        trials = []
        for layer, tensor, method in candidates:
            if self.passes(score):
                break
            trial = recipe.with_method(tensor, method)
            t_built, t_drop, t_score = self.measure(trial)
            trials.append({"layer": layer, "tensor": tensor, "method": method.value, "drop": round(t_drop, 3),
                           "kept": t_drop < drop})
            if t_drop < drop:
                recipe, (built, drop, score) = trial, (t_built, t_drop, t_score)
        changed = recipe != base.recipe
        self.steps.append(Step("tensor ranges", recipe, built, drop, score, changed,
                               {"what": f"the other calibration methods' ranges for the activations of the "
                                        f"{self.cfg.shortlist} most sensitive layers, one tensor at a time",
                                "tensors": built.tensor_ranges if changed else [], "trials": trials}))
        self.say(f"  tensor ranges: drop {drop:.2f} after {len(trials)} trials")

    def _keep_float(self, ranking: list[dict]) -> None:
        base = self.current
        gated = sorted((r for r in ranking if r.get("gate")), key=lambda r: r["gate"]["only_float_drop"])
        order = [r["layer"] for r in gated] + [r["layer"] for r in ranking if not r.get("gate")]
        order = [name for name in order if name not in base.recipe.keep_float]
        # at most max_float layers, and never half of them: a graph mostly in float is not an INT8 graph
        limit = min(self.cfg.max_float, (len(ranking) - 1) // 2)
        recipe, (built, drop, score) = base.recipe, (base.built, base.drop, base.score)
        added, trials = [], []
        for name in order:
            if self.passes(score) or len(added) >= limit:
                break
            trial = replace(recipe, keep_float=(*recipe.keep_float, name))
            t_built, t_drop, t_score = self.measure(trial)
            trials.append({"layer": name, "drop": round(t_drop, 3), "kept": t_drop < drop})
            if t_drop < drop:
                added.append(name)
                recipe, (built, drop, score) = trial, (t_built, t_drop, t_score)
        self.steps.append(Step("keep float", recipe, built, drop, score, bool(added),
                               {"what": f"the most sensitive layers left in float (FP16/FP32 on the device), in the "
                                        f"order the gate ranks them, until the gate passes (at most {limit} of "
                                        f"{len(ranking)} layers)",
                                "layers": added, "trials": trials}))
        self.say(f"  keep float {added}: drop {drop:.2f}")

    def _fewest(self) -> None:
        """Undo, latest first, each per-tensor range and each float layer the gate passes without."""
        base = self.current
        pinned = set(self.cfg.keep_float)
        changes = [("layer", name) for name in reversed(base.recipe.keep_float) if name not in pinned]
        changes += [("tensor", tensor) for tensor, _ in reversed(base.recipe.methods)]
        recipe, (built, drop, score) = base.recipe, (base.built, base.drop, base.score)
        undone: list[dict] = []
        progress = True
        while progress:  # again after an undo: another change may have been needed only with the undone one
            progress = False
            for kind, name in list(changes):
                if kind == "layer":
                    trial = replace(recipe, keep_float=tuple(n for n in recipe.keep_float if n != name))
                else:
                    trial = replace(recipe, methods=tuple(m for m in recipe.methods if m[0] != name))
                t_built, t_drop, t_score = self.measure(trial)
                if self.passes(t_score):
                    undone.append({kind: name, "drop": round(t_drop, 3)})
                    changes.remove((kind, name))
                    recipe, (built, drop, score) = trial, (t_built, t_drop, t_score)
                    progress = True
        self.steps.append(Step("fewest changes", recipe, built, drop, score, bool(undone),
                               {"what": "each float layer and per-tensor range undone, latest first, where the "
                                        "gate still passes without it", "undone": undone}))
        self.say(f"  fewest changes: undid {len(undone)}, drop {drop:.2f}")

    def _repairs(self, final: Step) -> list[dict]:
        """What was done to which layer in the shipped graph."""
        out = []
        for rows in (final.built.equalisation if final.recipe.equalise else []):
            if rows["equalised"]:
                out.append({"layer": rows["second"], "action": f"equalised with {rows['first']}",
                            "tensor": rows["tensor"], "imbalance_before": rows["imbalance_before"],
                            "imbalance_after": rows["imbalance_after"]})
        out.sort(key=lambda r: -r["imbalance_before"])
        for row in final.built.tensor_ranges:
            out.append({"tensor": row["tensor"], "action": f"{row['method']} range",
                        "amax_before": row["amax_before"], "amax": row["amax"]})
        for name in final.recipe.keep_float:
            out.append({"layer": name, "action": "kept float" + (" (pinned)" if name in self.cfg.keep_float else "")})
        return out

    def image_counts(self, final: Step) -> list[dict]:
        """The gate's drop, plain and with the final recipe re-derived, on subsets of the calibration images."""
        rows = []
        total = len(self.calib.refs)
        plain = next(s for s in self.steps if s.name == "plain")
        for count in sorted(set(self.cfg.image_counts)):
            if count > total:
                rows.append({"images": count, "available": total, "drop_plain": None, "drop_repaired": None})
                continue
            if count == total:
                drop_plain, drop_final, score = plain.drop, final.drop, final.score
            else:
                subset = ImageBatches([self.calib.refs[i] for i in spread(count, total)], self.calib.batch,
                                      self.calib.max_side, self.calib.input_name).check()
                _, drop_plain, score = self.measure(Recipe(), subset)
                if final.recipe != Recipe():
                    _, drop_final, score = self.measure(final.recipe, subset)
                else:
                    drop_final = drop_plain
            rows.append({"images": count, "drop_plain": round(drop_plain, 3), "drop_repaired": round(drop_final, 3),
                         "passed": self.passes(score)})
            self.say(f"  {count} calibration images: drop {drop_plain:.2f} plain, {drop_final:.2f} repaired")
        return rows


def _culprit(rows: list[dict]) -> dict | None:
    """The layer that breaks plain INT8: the top of the ranking, with its numbers."""
    if not rows:
        return None
    top = rows[0]
    return {"layer": top["layer"], "op": top["op"], "activations": top["activations"], "proxy": top["proxy"],
            "gate": top["gate"]}
