"""Shared fixtures. Kernel tests must test the compiled ops, not the reference against itself.

Time limits: every test has pytest-timeout's ``timeout`` (pyproject.toml); past it every thread's stack is
printed and the run ends, so a hang can never stall CI. Tests marked ``ray`` start Ray and train, and get
``RAY_TEST_TIMEOUT_S`` instead unless they set their own ``@pytest.mark.timeout``. The C++ extension is
built before the first test starts, so a cold build (minutes) does not count against one test's limit.
"""

from __future__ import annotations

import os

import pytest
import torch

# a Ray test's limit (its module's Ray start-up included): the outer bound for every Ray test of the suite
# (tests/distill/conftest.py fails a hung test there sooner, after RAYDISTILL_RAY_TEST_TIMEOUT_S)
RAY_TEST_TIMEOUT_S = 900


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("ray") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(RAY_TEST_TIMEOUT_S))
    if any("ext" in getattr(item, "fixturenames", ()) for item in items):
        from raydistill._build import load_extension

        load_extension()  # cached; a failed build is reported by the `ext` fixture


@pytest.fixture(scope="session")
def ext():
    """The loaded extension; fails loudly (no skip) if it did not build, unless disabled on purpose."""
    from raydistill._build import load_extension

    st = load_extension()
    if os.environ.get("RAYDISTILL_DISABLE_EXT", "0") in ("", "0"):
        assert st.loaded, f"raydistill extension failed to build: {st.reason}"
    return st


@pytest.fixture
def seeded():
    """A fresh, explicitly seeded generator per test (inputs are random, never zeros)."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g
