"""The papers' claims as statistics: paired t-intervals over seeds and their verdicts."""

from __future__ import annotations

import math

import pytest

from promptseg.claims import CLAIMS, claims_over_seeds, describe, paired_interval, t_critical_95, verdict


def test_t_interval_of_paired_differences():
    row = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2 dof) from the table
    assert row["mean"] == 2.0 and row["n"] == 3
    assert row["ci95_low"] == pytest.approx(2 - half, rel=1e-6)
    assert row["ci95_high"] == pytest.approx(2 + half, rel=1e-6)
    assert t_critical_95(4) == pytest.approx(2.776445, rel=1e-6)
    assert paired_interval([0.7]) == {"mean": 0.7, "ci95_low": None, "ci95_high": None, "n": 1}


@pytest.mark.parametrize("low, high, sign, expected", [
    (0.5, 2.0, +1, "holds"), (-2.0, -0.5, +1, "reversed"), (-0.5, 2.0, +1, "not shown"),
    (-2.0, -0.5, -1, "holds"), (0.5, 2.0, -1, "reversed"), (None, None, +1, "one seed"),
])
def test_a_claim_holds_only_when_its_interval_excludes_zero_on_the_claimed_side(low, high, sign, expected):
    assert verdict({"ci95_low": low, "ci95_high": high}, sign) == expected


def test_claims_over_seeds_pair_by_seed():
    per_seed = {
        0: {"baseline": {"cam_miou": 40.0, "context_leak": 0.50}, "clims": {"cam_miou": 44.0, "context_leak": 0.40}},
        1: {"baseline": {"cam_miou": 50.0, "context_leak": 0.40}, "clims": {"cam_miou": 53.0, "context_leak": 0.35}},
        2: {"baseline": {"cam_miou": 45.0, "context_leak": 0.45}, "clims": {"cam_miou": 50.0, "context_leak": 0.41}},
    }
    claims = claims_over_seeds(per_seed)
    assert set(claims) == {"clims_minus_baseline", "clims_minus_baseline_leak"}  # only what every seed has
    mean = claims["clims_minus_baseline"]
    assert mean["mean"] == 4.0 and mean["verdict"] == "holds"  # 4, 3, 5: paired, not means of the two columns
    leak = claims["clims_minus_baseline_leak"]
    assert leak["mean"] == pytest.approx(-0.0633333) and leak["verdict"] == "not shown"
    assert "95% CI" in describe("clims_minus_baseline", mean) and "over 3 seeds" in describe("x", mean)
    assert {c.name for c in CLAIMS} >= {"semples_minus_no_suppression", "pole_minus_clims_leak"}
