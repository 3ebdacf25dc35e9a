"""Ctrl-C handling without Ray: a trainer whose fit() behaves like Ray Train's (it installs a SIGINT handler
that exits 0 when called from the main thread, then blocks) is still interrupted at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import signal, sys, threading, time
from raydistill.distill import interrupts

class RayLikeTrainer:
    def fit(self):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *a: sys.exit(0))  # what TorchTrainer.fit() does
        time.sleep(60)
        return "finished"

try:
    with interrupts.handle_interrupts(grace_s=float(sys.argv[2])):
        print("ready", flush=True)
        if sys.argv[1] == "fit":
            interrupts.fit(RayLikeTrainer())
        else:  # a wait that ignores KeyboardInterrupt: the grace period must end the process
            while True:
                try:
                    time.sleep(60)
                except KeyboardInterrupt:
                    print("swallowed", flush=True)
except KeyboardInterrupt:
    print("interrupted", interrupts.interrupted(), flush=True)
    sys.exit(130)
print("not interrupted", flush=True)
"""


def _run(mode, grace, signals=1):
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(grace)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    t0 = time.time()
    for _ in range(signals):
        os.killpg(p.pid, signal.SIGINT)
        time.sleep(0.3)
    out, _ = p.communicate(timeout=60)
    return p.returncode, out, time.time() - t0


def test_ctrl_c_interrupts_a_ray_like_fit_at_once():
    rc, out, took = _run("fit", grace=30)
    assert rc == 130 and "interrupted True" in out, out
    assert took < 10, took


@pytest.mark.parametrize("signals, limit", [(1, 20), (2, 10)])
def test_grace_period_or_second_ctrl_c_forces_exit_130(signals, limit):
    rc, out, took = _run("swallow", grace=3, signals=signals)
    assert rc == 130 and "swallowed" in out, out
    assert took < limit, took
