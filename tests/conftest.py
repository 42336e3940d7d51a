from __future__ import annotations

from pathlib import Path

import pytest

from promptseg.data.synth import SynthConfig, write_world


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small synthetic world shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("world")
    write_world(root, SynthConfig(seed=3, train=96, val=32))
    return root
