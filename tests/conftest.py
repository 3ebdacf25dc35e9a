"""Shared fixtures. Kernel tests must test the compiled ops, not the reference against itself."""

from __future__ import annotations

import os

import pytest
import torch


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
