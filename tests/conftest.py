"""The suite's rules, and where its fixtures live. Tests never touch the network or the developer's own
files (fixtures/isolation.py, autouse); MNIST comes from a local copy (fixtures/mnist.py), and every
download path is exercised against servers on 127.0.0.1.

Every shared fixture and helper is in tests/fixtures/, one module per world (its __init__ lists them);
each module is registered here, so a test just names the fixture it needs."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "fixtures.isolation",
    "fixtures.mnist",
    "fixtures.cli",
    "fixtures.install",
    "fixtures.aws",
    "fixtures.forged",
    "fixtures.ssh",
    "fixtures.project",
]


def pytest_collection_modifyitems(config, items):
    """`cuda` and `mps` tests run where that device exists, and are reported as skipped elsewhere."""
    import torch

    from trainer.device import mps_available

    missing = {"cuda": None if torch.cuda.is_available() else "no CUDA GPU visible to torch",
               "mps": None if mps_available() else "no Apple MPS device"}
    for item in items:
        for mark, why in missing.items():
            if why and item.get_closest_marker(mark):
                item.add_marker(pytest.mark.skip(reason=why))
