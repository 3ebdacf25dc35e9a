"""One Ray instance for all Ray tests of this package, and a hard time limit for each Ray test.

Ray tests get a watchdog (``RAYDISTILL_RAY_TEST_TIMEOUT_S``, default 300 s per test): SIGALRM fails the
test with every thread's stack in the message (Ray's blocking calls check for signals, as for Ctrl-C). If
the test still has not returned 60 s later, a watchdog thread stops pytest's output capture, prints every
thread's stack to the real stderr and exits the process (status 3), so a hang can never block CI silently.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tune_configs" / "mnist1d_tiny.yaml"
RAY_TEST_TIMEOUT_S = int(os.environ.get("RAYDISTILL_RAY_TEST_TIMEOUT_S", "300"))
HARD_EXIT_GRACE_S = int(os.environ.get("RAYDISTILL_RAY_TEST_GRACE_S", "60"))


class RayTestTimeout(Exception):
    pass


def _all_stacks() -> str:
    with tempfile.TemporaryFile("w+") as fh:  # faulthandler needs a real file descriptor
        faulthandler.dump_traceback(file=fh, all_threads=True)
        fh.seek(0)
        return fh.read()


@pytest.fixture(autouse=True)
def _ray_test_watchdog(request):
    """Per-test time limit for tests marked ``ray`` (no-op where SIGALRM is missing)."""
    if request.node.get_closest_marker("ray") is None or not hasattr(signal, "SIGALRM"):
        yield
        return
    limit = RAY_TEST_TIMEOUT_S
    done = threading.Event()

    def on_alarm(signum, frame):
        raise RayTestTimeout(f"{request.node.nodeid} exceeded its {limit} s limit "
                             f"(RAYDISTILL_RAY_TEST_TIMEOUT_S); stacks:\n{_all_stacks()}")

    def hard_exit():
        if done.wait(limit + HARD_EXIT_GRACE_S):
            return
        capman = request.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=True)
        print(f"\n*** {request.node.nodeid}: still running {HARD_EXIT_GRACE_S} s after its {limit} s limit "
              "(the timeout exception did not end it); stacks follow, then exit(3) ***", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(3)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    threading.Thread(target=hard_exit, name="ray-test-watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
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
