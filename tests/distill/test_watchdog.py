"""The watchdog without Ray: a "driver" starts it, then a child process; killing the driver kills that
child (and only what appeared after the watchdog started); a clean stop kills nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]

DRIVER = """
import subprocess, sys, time
old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # before the watchdog
from raydistill.distill import watchdog
dog = watchdog.start(poll_s=0.1)
new = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # "Ray", after it
time.sleep(1.0)  # the watchdog records it
print(old.pid, new.pid, dog.pid, flush=True)
if sys.argv[1] == "stop":
    dog.stop()
    print("stopped", flush=True)
time.sleep(120)
"""


def _driver(mode):
    p = subprocess.Popen([sys.executable, "-c", DRIVER, mode], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    old, new, dog = map(int, p.stdout.readline().split())
    return p, psutil.Process(old), psutil.Process(new), psutil.Process(dog)


def _gone(proc, timeout=15.0) -> bool:
    try:
        proc.wait(timeout)
        return True
    except psutil.TimeoutExpired:
        return False


def _cleanup(*procs):
    for q in procs:
        try:
            q.kill()
        except psutil.Error:
            pass


def test_killing_the_driver_kills_what_it_started_after_the_watchdog():
    p, old, new, dog = _driver("kill")
    try:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        assert _gone(new), "the process started after the watchdog outlived the SIGKILLed driver"
        assert _gone(dog)  # the watchdog exits too
        assert old.is_running()  # what existed before the watchdog is not its business
    finally:
        _cleanup(old, new, dog)
        p.kill()


def test_a_clean_stop_kills_nothing():
    p, old, new, dog = _driver("stop")
    try:
        assert p.stdout.readline().strip() == "stopped"
        assert _gone(dog, 5)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        time.sleep(1.0)
        assert new.is_running() and old.is_running()
    finally:
        _cleanup(old, new, dog)
        p.kill()
