"""The datasets of each stage, from the config: the task's own (``Task.datasets``), with the train rows of a
distillation stage read from an offline teacher's top-k outputs when the job has one; the storage root and its
check (a writable directory with room).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

from raydistill.config import Config, ConfigError


def resolve_storage(storage_path: str | os.PathLike | None, cfg: Config | None = None) -> Path:
    p = storage_path or (cfg.run.storage_path if cfg is not None else None) or "runs"
    return Path(p).expanduser().resolve()


def check_storage(path, key: str = "run.storage_path") -> Path:
    """``path`` is a directory this process can write to (created if missing), with room for a few bytes."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {p} is a file, not a directory; pass a directory for runs and checkpoints")
    probe = None
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".raydistill-write-probe-", dir=p)
        with os.fdopen(fd, "wb") as fh:  # an empty file needs no room: write some, so a full disk shows here
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ConfigError(f"{key}: no space left on device at {p}; free some space or pass another "
                              f"directory") from None
        raise ConfigError(f"{key}: {p} is not a writable directory ({exc.strerror or exc})") from None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return p


def task_info(cfg: Config, storage: Path) -> dict:
    from raydistill.tasks import get_task

    return get_task(cfg.data.task).task_info(cfg, storage)


class StageData(NamedTuple):
    """A stage's Ray datasets (``{"train", "eval"}``), its train rows, and ``materialize``: whether workers hold
    their shard of the train rows in memory, where the stage's data decides it (an offline teacher's cache:
    :func:`raydistill.distill.offline.hold_in_memory`); None leaves it to the task (``task_info``)."""

    datasets: dict
    rows: int
    materialize: bool | None = None


def stage_datasets(cfg: Config, storage: Path, kind: str) -> StageData:
    """The Ray datasets of a stage: ``kind`` ``ce`` the labelled rows, ``kd`` the distillation rows (with the
    transfer set where the task has one), or the offline teacher's top-k outputs (``teacher_outputs``),
    which hold the rows themselves (the task's own train rows are not built then): checked against the
    config (and the tokenizer, where the task has one), read and decoded lazily by Ray Data tasks that
    stream them to the workers while they train (``raydistill.data.topk_cache.read_dataset``: the tasks take
    no CPU, so they cannot wait behind the workers for one)."""
    from raydistill.tasks import get_task

    task = get_task(cfg.data.task)
    if kind == "kd" and cfg.teacher_outputs_path() is not None:
        from raydistill.distill.offline import hold_in_memory, offline_dataset

        ds, info = offline_dataset(cfg, task.task_info(cfg, storage).get("tokenizer_dir"))
        return StageData({"train": ds, "eval": task.eval_dataset(cfg, storage)}, info.rows,
                         hold_in_memory(cfg, info))
    datasets, rows = task.datasets(cfg, storage, transfer=kind == "kd")
    return StageData(datasets, rows)


def distill_rows(cfg: Config, storage: Path) -> int:
    """The train rows of the distillation stages (the baseline matches their optimizer steps)."""
    if cfg.teacher_outputs_path() is not None:
        from raydistill.distill.offline import check_teacher_outputs

        return check_teacher_outputs(cfg).rows
    from raydistill.tasks import get_task

    return get_task(cfg.data.task).train_rows(cfg, storage, transfer=True)
