"""Shared fixtures. Kernel tests must test the compiled ops, not the reference against itself.

Time limits: every test has pytest-timeout's ``timeout`` (pyproject.toml); past it every thread's stack is
printed and the run ends, so a hang can never stall CI. Tests marked ``ray`` start Ray and train, and get
``RAY_TEST_TIMEOUT_S`` instead unless they set their own ``@pytest.mark.timeout``. The C++ extension is
built before the first test starts, so a cold build (minutes) does not count against one test's limit.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch


def _inductor_cache_per_op_sources() -> None:
    """torch.compile's on-disk cache is per user, shared by every checkout on the machine, and its key does not
    cover our ops' Python wrappers: a graph compiled by a checkout whose op took one more argument was
    replayed here ("expected at most 19 argument(s) but received 20"). One cache per version of csrc/ and
    raydistill/ops/ keeps reuse within a version and none across versions."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted([*(root / "csrc").rglob("*"), *(root / "raydistill" / "ops").rglob("*.py")]):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) /
                                                f"torchinductor_raydistill_{h.hexdigest()[:12]}")


_inductor_cache_per_op_sources()

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
