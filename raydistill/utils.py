"""Small helpers with one home, below every other layer: atomic JSON writes, directories written for the user
(replaced only when they are ours), the model inside its training wrappers, machine info for benchmark JSON."""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["error_line", "machine_info", "new_jsonl_lines", "no_space_left", "unwrap_model", "write_json_atomic", "check_output_dir",
           "replace_dir_atomically", "EXPORT_MARKER"]

EXPORT_MARKER = ".raydistill-export.json"


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=indent, default=str))
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def error_line(text: str, limit: int = 400) -> str:
    """The line of an error's text (a traceback, Ray's wrapper of a worker's error) that names it: the last
    one mentioning an ``Error`` or ``Exception``, else the last line; at most ``limit`` characters."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return (named[-1] if named else lines[-1] if lines else "")[:limit]


def new_jsonl_lines(path: str | os.PathLike, offset: int) -> tuple[list[dict], int]:
    """The complete lines appended to the jsonl file ``path`` since byte ``offset``, parsed (a line still
    being written waits for the next call, a line that is no JSON is skipped), and the offset after them."""
    p = Path(path)
    if not p.is_file():
        return [], offset
    with open(p, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    chunk = chunk[: chunk.rfind(b"\n") + 1]
    out = []
    for line in chunk.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            continue
    return out, offset + len(chunk)


def no_space_left(exc: BaseException) -> OSError | bool:
    """Whether a full disk (``ENOSPC``) is behind ``exc``, through its chain of causes and Ray's wrappers
    (a worker's error reaches the driver as text): the ``OSError`` when one is found, else True or False."""
    import errno

    seen: set[int] = set()
    stack: list = [exc]
    found = False
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        found = found or f"[Errno {errno.ENOSPC}]" in str(e) or "No space left on device" in str(e)
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return found


def check_output_dir(path: str | os.PathLike, *, key: str = "out_dir", marker: str = EXPORT_MARKER,
                     error: type[Exception] = ValueError) -> Path:
    """Check that a directory may be written at ``path`` for the user, before anything is written: it must
    not be a symbolic link or an existing file, and an existing directory must be empty or an earlier
    output of ours (it holds ``marker``, which :func:`replace_dir_atomically` writes into every directory it
    creates). Anything else is ``error`` naming ``key`` and the path: nothing of the user's is replaced.
    Returns the absolute path (the link itself is refused, not followed)."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if p.is_symlink():
        raise error(f"{key}: {p} is a symbolic link; refusing to write through or replace it: pass a real directory")
    if p.exists() and not p.is_dir():
        raise error(f"{key}: {p} is an existing file, not a directory; refusing to replace it: pass a directory path")
    if p.is_dir():
        try:
            entries = [e.name for e in os.scandir(p)]
        except OSError as exc:
            raise error(f"{key}: {p} cannot be read ({exc.strerror or exc})") from None
        if entries and marker not in entries:
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise error(f"{key}: {p} is not empty ({shown}) and is not an earlier raydistill output (no {marker}); "
                        "refusing to replace it: choose a new directory, or empty or remove this one yourself")
    return p


def replace_dir_atomically(path: str | os.PathLike, write_fn: Callable[[Path], Any], *, key: str = "out_dir",
                           marker: str = EXPORT_MARKER, error: type[Exception] = ValueError,
                           description: str = "") -> Path:
    """Write a directory for the user at ``path``: :func:`check_output_dir` first, then ``write_fn(tmp)``
    into a temporary sibling (``.<name>.tmp-*``) that gets ``marker`` and is renamed to ``path``; an earlier
    output of ours there is replaced only then. On any error (or Ctrl-C) the temporary directory is removed
    and ``path`` is left as it was. Returns the absolute path."""
    out = check_output_dir(path, key=key, marker=marker, error=error)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # (not mkdtemp: the directory gets the usual permissions, not 0700)
    old = None
    try:
        write_fn(tmp)
        (tmp / marker).write_text(json.dumps({"written_by": "raydistill", "what": description,
                                              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        check_output_dir(out, key=key, marker=marker, error=error)  # still ours (or absent) at the swap
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # onto the empty placeholder: the earlier output moves aside whole
        os.rename(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # put the earlier output back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def machine_info(device: str = "cpu", *, repo: str | os.PathLike | None = None) -> dict:
    """What a benchmark JSON records about where it ran: CPU, threads, torch, load average, git commit."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    root = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {"platform": platform.platform(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(), "git_commit": commit,
            "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "device": str(device), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"
        info["cuda"] = torch.version.cuda
    return info


def results_dir() -> Path:
    """Where benchmarks write JSON: ``benchmarks/results`` of the repository checkout this package runs
    from (editable install), else ``./benchmarks/results`` under the current directory -- never inside an
    installed package's tree (site-packages)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "benchmarks").is_dir():
        return root / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"


def cuda_median_ms(fn, *, reps: int = 10, warmup: int = 3, calls: int = 1) -> float:
    """Median milliseconds per call of ``fn`` on the current CUDA stream: CUDA events around ``calls``
    back-to-back calls, ``reps`` times, after ``warmup`` untimed calls (host launch gaps inside count)."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def _proc_status_bytes() -> dict[str, int]:
    """Every ``kB`` field of ``/proc/self/status`` in bytes, from one read; empty where there is no such file
    (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0]) * 1024
    return out


def proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``: the peak RSS) in bytes; None where
    there is no such file (not Linux)."""
    return _proc_status_bytes().get(field)


def memory_mib(device=None) -> dict[str, float]:
    """This process's memory now and at its peak, in MiB: on CUDA ``torch.cuda.memory_allocated`` and
    ``max_memory_allocated`` (what the caching allocator handed out), elsewhere the resident set
    (``VmRSS``) and its peak (``VmHWM``; ``ru_maxrss`` where there is no ``/proc``)."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return {"now": torch.cuda.memory_allocated(device) / 2**20,
                "peak": torch.cuda.max_memory_allocated(device) / 2**20}
    status = _proc_status_bytes()  # one read for both
    now, peak = status.get("VmRSS"), status.get("VmHWM")
    if now is None or peak is None:
        import resource

        import psutil

        now = psutil.Process().memory_info().rss
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"now": now / 2**20, "peak": peak / 2**20}


def unwrap_model(model):
    """The model inside DDP/DataParallel/torch.compile wrappers (the model itself when it has none)."""
    from torch import nn

    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
