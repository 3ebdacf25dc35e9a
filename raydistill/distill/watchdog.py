"""A local Ray started by raydistill never outlives its driver, even when the driver is SIGKILLed.

``ray.init()`` fate-shares the GCS and raylet with the driver, but the raylet's children
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, ~210 MB) are reparented to PID 1 when the driver dies
by SIGKILL and live on until ``ray stop``. :func:`start` launches a tiny watchdog process, in its own
session (a Ctrl-C to the terminal's process group does not reach it), connected to the driver by a pipe:

* every ``poll_s`` it records the driver's descendant processes (PID + start time) that appeared after it
  started, i.e. the ones this Ray session created;
* the driver's normal shutdown writes ``stop``: the watchdog exits and touches nothing;
* end of file without ``stop`` means the driver died: the watchdog terminates (then kills) every recorded
  process that is still the same process (same start time: a reused PID is never touched) and exits.

Run as ``python -m raydistill.distill.watchdog DRIVER_PID POLL_S [PID,PID,...]`` (the driver's children
before Ray started, never touched).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys


class Watchdog:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 5.0) -> None:
        """The driver is shutting down cleanly: let the watchdog exit without killing anything."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.flush()
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(poll_s: float = 0.5) -> Watchdog | None:
    """Start the watchdog for this (driver) process; ``None`` if it cannot start (then Ray runs without)."""
    try:
        import psutil  # noqa: F401 - the watchdog needs it; fail here, not silently in the child
    except ImportError:  # pragma: no cover
        return None
    import psutil

    try:  # what this process already runs is not Ray's: never the watchdog's to kill
        before = ",".join(str(c.pid) for c in psutil.Process().children(recursive=True))
    except psutil.Error:  # pragma: no cover
        before = ""
    try:
        proc = subprocess.Popen([sys.executable, "-m", "raydistill.distill.watchdog", str(os.getpid()), str(poll_s),
                                 before],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                                close_fds=True)
    except OSError:  # pragma: no cover
        return None
    return Watchdog(proc)


def _kill(tracked: dict[int, float], timeout: float = 3.0) -> None:
    import psutil

    procs = []
    for pid, created in tracked.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:
                procs.append(p)
                procs.extend(c for c in p.children(recursive=True) if c.pid not in tracked)
        except psutil.Error:
            continue
    terminate(procs, timeout)


def terminate(procs: list, timeout: float = 3.0) -> None:
    """SIGTERM each ``psutil.Process``, then SIGKILL those still alive after ``timeout`` seconds."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)


def main(argv: list[str]) -> int:
    import psutil

    driver_pid, poll_s = int(argv[0]), float(argv[1])
    before = {int(p) for p in argv[2].split(",") if p} if len(argv) > 2 else set()
    me = os.getpid()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return 0
    tracked: dict[int, float] = {}
    fd = sys.stdin.fileno()
    while True:
        try:
            for c in driver.children(recursive=True):
                if c.pid != me and c.pid not in before and c.pid not in tracked:
                    with contextlib.suppress(psutil.Error):
                        tracked[c.pid] = c.create_time()
        except psutil.Error:
            break  # the driver is gone
        ready, _, _ = select.select([fd], [], [], poll_s)
        if ready:
            data = os.read(fd, 64)
            if b"stop" in data:
                return 0
            if not data:
                break  # end of file: the driver died without saying stop
    _kill(tracked)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
