"""The README's figures come from the result files, not from hand copies."""

from __future__ import annotations

import json
import re
from pathlib import Path

from promptseg.claims import README_END, README_START, claims_table

ROOT = Path(__file__).parent.parent


def test_the_readme_claims_table_is_the_one_methods_cpu_json_gives():
    result = json.loads((ROOT / "bench" / "results" / "methods_cpu.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = re.search(re.escape(README_START) + ".*?" + re.escape(README_END), readme, re.S)
    assert block is not None and block.group(0) == claims_table(result)
    assert set(result["differences"]) >= {"clims_minus_baseline", "pole_minus_clims", "semples_minus_clims"}
    for row in result["differences"].values():
        assert set(row) >= {"mean", "ci95_low", "ci95_high"}


def test_the_readme_stays_a_users_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_ci_runs_exactly_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"## Tests\s+```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    assert command.endswith("python -m pytest -q")
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == command
