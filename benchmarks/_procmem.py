"""Helpers the per-process benchmarks share: run one measurement in a fresh (spawned) process, and its
memory: the RSS now, the peak RSS (``VmHWM``) since a reset through ``/proc/self/clear_refs``; a poller that
samples something in a thread while a measurement runs."""

from __future__ import annotations

import multiprocessing as mp
import threading

from raydistill.bench.kd_loss import _reset_peak_rss  # /proc/self/clear_refs
from raydistill.utils import memory_mib  # VmRSS / VmHWM, with the fallbacks off Linux


def rss() -> int:
    return int(memory_mib()["now"] * 2**20)


def reset_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux); False where that is not possible."""
    return _reset_peak_rss()


def peak() -> int:
    """Peak RSS in bytes since the last :func:`reset_peak` (else since the process started)."""
    return int(memory_mib()["peak"] * 2**20)


def _child(fn, args, q) -> None:
    try:
        q.put(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        import traceback

        q.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a spawned process (its own memory and threads); its result, or RuntimeError with
    the child's traceback. ``fn`` must be importable (a module-level function)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    status, val = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}: {val}")
    return val


class Poller:
    """A context manager calling ``self._sample()`` every ``every`` seconds in a thread while its block runs,
    and once more at its end (subclasses keep what they sample)."""

    def __init__(self, every: float):
        self.every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
