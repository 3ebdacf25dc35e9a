"""Ctrl-C for a whole ``raydistill distill`` job: stop any stage within seconds, exit 130, leave nothing behind.

Why this is needed: ``TorchTrainer.fit()`` called from the main thread installs Ray Train's own SIGINT
handler and never restores it. After the teacher's ``fit()`` that handler points at a finished controller:
a later Ctrl-C calls ``sys.exit(0)`` inside it, the concurrent student stages keep training to the end
and the job exits 0. So:

* :func:`fit` runs ``trainer.fit()`` in a daemon thread and waits for it in the caller (Ray then leaves
  SIGINT alone, as it does inside Tune), and :func:`wait_all` does the same for concurrent trainers;
* :func:`handle_interrupts` installs, for the duration of the job, a SIGINT/SIGTERM handler that raises
  ``KeyboardInterrupt`` in the main thread (the job unwinds: ``ray.shutdown()``, run lock released) and
  arms a fallback: if the process is still alive ``grace_s`` later (or on a second Ctrl-C), it kills its
  own child processes (by PID, children of this process only) and exits with status 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from typing import Callable

EXIT_INTERRUPTED = 130
_state = {"interrupted": False, "when": None}


def interrupted() -> bool:
    """Whether a SIGINT / SIGTERM arrived during the current :func:`handle_interrupts` block."""
    return bool(_state["interrupted"])


def kill_children(timeout: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every descendant process of this one; returns their PIDs."""
    import psutil

    from raydistill.distill.watchdog import terminate

    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    terminate(kids, timeout)
    return [k.pid for k in kids]


def _force_exit(message: str) -> None:
    with contextlib.suppress(Exception):
        print(message, file=sys.stderr, flush=True)
    kill_children()
    os._exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def handle_interrupts(grace_s: float = 20.0, on_force: str = "raydistill: still stopping after the grace "
                                                                "period; killed its processes"):
    """SIGINT / SIGTERM -> ``KeyboardInterrupt`` in the main thread, with a forced exit (status 130) after
    ``grace_s`` seconds or on the next signal. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.update(interrupted=False, when=None)

    def handler(signum, frame):
        if _state["interrupted"]:
            _force_exit(f"{on_force} (second {signal.Signals(signum).name})")
        _state.update(interrupted=True, when=time.time())

        def fallback():
            time.sleep(grace_s)
            _force_exit(on_force)

        threading.Thread(target=fallback, name="raydistill-interrupt-fallback", daemon=True).start()
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def submit(fn: Callable, *args, name: str = "raydistill-fit", **kwargs) -> Future:
    """Run ``fn`` in a daemon thread (never joined at interpreter exit); its result in a Future."""
    fut: Future = Future()

    def run():
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            fut.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


def result(fut: Future, poll_s: float = 0.2):
    """``fut.result()``, waiting in short slices so that a signal handler runs promptly."""
    while True:
        try:
            return fut.result(timeout=poll_s)
        except TimeoutError:
            continue


def fit(trainer):
    """``trainer.fit()`` off the main thread (so Ray Train does not take over SIGINT), waited for here."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    return result(submit(trainer.fit))
