"""One run at a time per run directory: ``run_lock(run_dir)`` takes an exclusive, non-blocking file lock.

Two ``raydistill distill`` processes with the same storage path and ``--name`` would train every stage
twice into the same directories (duplicated epochs.jsonl lines, extra checkpoints, two reports). The
second one now fails at once with :class:`RunInUse`. The lock is an ``flock`` (``filelock``): the kernel
drops it when its holder dies, even by SIGKILL, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from raydistill.config import ConfigError

LOCK_FILE = ".run.lock"
OWNER_FILE = ".run.owner"


class RunInUse(ConfigError):
    """Another live process holds the run directory's lock."""


@contextlib.contextmanager
def run_lock(run_dir):
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = (run_dir / OWNER_FILE).read_text().strip()
        except OSError:
            owner = "unknown"
        raise RunInUse(f"run directory {run_dir} is in use by another raydistill run (process {owner}); wait for "
                       f"it to finish or stop it, or pass a different --name") from None
    try:
        (run_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        yield run_dir
    finally:
        with contextlib.suppress(OSError):
            (run_dir / OWNER_FILE).unlink()
        lock.release()
