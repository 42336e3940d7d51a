"""The papers' claims as statistics over seeds, and as plain differences on a single run.

Each claim compares two methods of the same run on one metric, in a claimed direction (CLIMS's CAM
mIoU above the baseline's, SemPLeS's context leak below CLIMS's, ...). Over seeds the difference is
paired by seed and summarised by its mean and a two-sided 95% t-interval (n - 1 degrees of
freedom). A claim **holds** when the interval excludes zero on the claimed side, is **reversed**
when it excludes zero on the other side, and is **not shown** when it covers zero. One run gives a
difference and nothing more: it is reported with "one seed", never as a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    name: str
    method: str
    reference: str
    metric: str  # cam_miou or context_leak
    sign: int  # +1: the method's value above the reference's; -1: below

    @property
    def wording(self) -> str:
        what = "CAM mIoU" if self.metric == "cam_miou" else "context leak"
        return f"{self.method} {'above' if self.sign > 0 else 'below'} {self.reference} in {what}"


def _pair(name: str, method: str, reference: str) -> tuple[Claim, Claim]:
    return (Claim(f"{name}", method, reference, "cam_miou", +1),
            Claim(f"{name}_leak", method, reference, "context_leak", -1))


CLAIMS: tuple[Claim, ...] = (
    *_pair("clims_minus_baseline", "clims", "baseline"),
    *_pair("pole_minus_clims", "pole", "clims"),
    *_pair("semples_minus_clims", "semples", "clims"),
    *_pair("semples_minus_no_suppression", "semples", "semples_no_suppression"),
)


def t_critical_95(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def paired_interval(differences: Sequence[float]) -> dict:
    """Mean of per-seed differences and its 95% t-interval (None bounds with fewer than two seeds)."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return {"mean": mean, "ci95_low": None, "ci95_high": None, "n": n}
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = t_critical_95(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "n": n}


def verdict(interval: Mapping, sign: int) -> str:
    """holds / reversed / not shown (see the module's doc); "one seed" without an interval."""
    low, high = interval["ci95_low"], interval["ci95_high"]
    if low is None:
        return "one seed"
    if low > 0 or high < 0:
        return "holds" if (low > 0) == (sign > 0) else "reversed"
    return "not shown"


def claims_over_seeds(per_seed: Mapping[int, Mapping[str, Mapping]]) -> dict[str, dict]:
    """``per_seed``: seed -> method -> {"cam_miou", "context_leak", ...}. Each claim whose methods and
    metric every seed has: its paired interval, the claimed direction and the verdict."""
    out = {}
    for claim in CLAIMS:
        values = [(row[claim.method].get(claim.metric), row[claim.reference].get(claim.metric))
                  for row in per_seed.values() if claim.method in row and claim.reference in row]
        if len(values) != len(per_seed) or not values or any(a is None or b is None for a, b in values):
            continue
        interval = paired_interval([a - b for a, b in values])
        out[claim.name] = {**interval, "claim": claim.wording, "verdict": verdict(interval, claim.sign)}
    return out


def one_run_differences(methods: Mapping[str, Mapping]) -> dict[str, dict]:
    """The same differences on a single run, each marked as one seed (no verdict)."""
    return claims_over_seeds({0: methods})


def describe(name: str, row: Mapping) -> str:
    """One line for a report: the difference, its interval or "one seed", and the verdict."""
    unit = "" if name.endswith("_leak") else " mIoU"
    fmt = ".3f" if name.endswith("_leak") else ".1f"
    if row["ci95_low"] is None:
        return (f"{name}: {row['mean']:+{fmt}}{unit} (one seed; claimed: {row['claim']}; "
                "`bench/methods_cpu.py` gives the interval over seeds)")
    return (f"{name}: {row['mean']:+{fmt}}{unit}, 95% CI [{row['ci95_low']:+{fmt}}, {row['ci95_high']:+{fmt}}] "
            f"over {row['n']} seeds; claimed: {row['claim']}: {row['verdict']}")


def method_intervals(per_seed: Mapping[int, Mapping[str, Mapping]], metric: str) -> dict[str, dict]:
    """Per method, the mean of ``metric`` over seeds and its 95% t-interval."""
    methods = [m for m in next(iter(per_seed.values())) if all(m in row for row in per_seed.values())]
    out = {}
    for method in methods:
        values = [row[method].get(metric) for row in per_seed.values()]
        if all(v is not None for v in values):
            out[method] = paired_interval(values)
    return out


README_START, README_END = "<!-- claims table: generated by bench/methods_cpu.py -->", "<!-- end of claims table -->"


def claims_table(result: Mapping) -> str:
    """The README's claims table from ``bench/results/methods_cpu.json`` (its ``differences``)."""
    lines = [README_START, "",
             f"Seeds {', '.join(map(str, result['seeds']))} ({len(result['seeds'])}); paired by seed, mean and 95% "
             "t-interval; a claim holds only when its interval excludes zero on the claimed side.", "",
             "| claim | difference | 95% CI | verdict |", "| --- | ---: | --- | --- |"]
    for name, row in result["differences"].items():
        fmt = ".3f" if name.endswith("_leak") else ".1f"
        interval = "—" if row["ci95_low"] is None else f"[{row['ci95_low']:+{fmt}}, {row['ci95_high']:+{fmt}}]"
        lines.append(f"| {row['claim']} | {row['mean']:+{fmt}} | {interval} | {row['verdict']} |")
    return "\n".join([*lines, "", README_END])
