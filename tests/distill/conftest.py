"""One Ray instance for all Ray tests of this package (module-scoped would start several)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tune_configs" / "mnist1d_tiny.yaml"


@pytest.fixture(scope="session")
def ray_local():
    from raydistill.distill.session import ray_session

    with ray_session(num_cpus=min(2, os.cpu_count() or 1)) as ray:
        yield ray
    # ray_session shut Ray down on exit
    import ray as _ray

    assert not _ray.is_initialized()


@pytest.fixture(scope="session")
def storage(tmp_path_factory):
    """Shared storage: the tiny teacher is trained once and reused from the cache by later tests."""
    return tmp_path_factory.mktemp("rd_storage")


@pytest.fixture
def tiny():
    from raydistill.config import load_config

    def make(*overrides):
        return load_config(TINY, list(overrides))

    return make
