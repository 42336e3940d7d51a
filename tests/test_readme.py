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



def _commands(group, path=()):
    """Every command of the CLI with its path of names."""
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_command_has_help_that_explains():
    from click.testing import CliRunner

    from promptseg.cli import main

    found = list(_commands(main))
    assert len(found) >= 15
    for path, command in found:
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, path
        assert len((command.help or "").split()) >= 6, f"{' '.join(path)}: --help says too little"


def test_the_readmes_command_table_names_commands_and_options_that_exist():
    """Each ``promptseg ...`` in README's command table is a command, and each ``--option`` it shows is one of
    that command's options, so the table cannot drift from the CLI."""
    from promptseg.cli import main

    commands = {" ".join(path): command for path, command in _commands(main)}
    table = (ROOT / "README.md").read_text().split("## Commands", 1)[1].split("\n\n", 2)[1]
    checked = 0
    for usage in re.findall(r"`(promptseg [^`]+)`", table):
        words = usage.replace("\\|", "|").split()[1:]
        name = " ".join(words[:2]) if " ".join(words[:2]) in commands else words[0]
        assert name in commands, usage
        options = {opt for param in commands[name].params
                   for opt in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ()))}
        for option in re.findall(r"--[a-z][a-z0-9-]*", usage):
            if option not in ("--min", "--opt", "--max"):  # written "--min/opt/max-shape" in the table
                assert option in options, f"{usage}: {option}"
        checked += 1
    assert checked >= 15
