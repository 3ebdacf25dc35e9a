"""The datasets of each stage, from the config: the task's own (``Task.datasets``), with the train rows of a
distillation stage read from an offline teacher's top-k outputs when the job has one; the storage root.
"""

from __future__ import annotations

import os
from pathlib import Path

from raydistill.config import Config, ConfigError


def resolve_storage(storage_path: str | os.PathLike | None, cfg: Config | None = None) -> Path:
    p = storage_path or (cfg.run.storage_path if cfg is not None else None) or "runs"
    return Path(p).expanduser().resolve()


def task_info(cfg: Config, storage: Path) -> dict:
    from raydistill.tasks import get_task

    return get_task(cfg.data.task).task_info(cfg, storage)


def stage_datasets(cfg: Config, storage: Path, kind: str) -> tuple[dict, int]:
    """``{"train", "eval"}`` Ray datasets of a stage and its train rows: ``kind`` ``ce`` the labelled rows,
    ``kd`` the distillation rows (with the transfer set where the task has one), or the offline teacher's
    top-k outputs (``teacher_outputs``), which hold the rows themselves."""
    from raydistill.tasks import get_task

    task = get_task(cfg.data.task)
    path = _teacher_outputs(cfg) if kind == "kd" else None
    datasets, rows = task.datasets(cfg, storage, transfer=kind == "kd" and path is None)
    if path is not None:
        from raydistill.data import read_teacher_outputs

        datasets["train"] = read_teacher_outputs(str(path)).materialize()
        rows = datasets["train"].count()
    return datasets, rows


def distill_rows(cfg: Config, storage: Path) -> int:
    """The train rows of the distillation stages (the baseline matches their optimizer steps)."""
    path = _teacher_outputs(cfg)
    if path is not None:
        import pyarrow.parquet as pq

        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    from raydistill.tasks import get_task

    return get_task(cfg.data.task).train_rows(cfg, storage, transfer=True)


def _teacher_outputs(cfg: Config) -> Path | None:
    raw = cfg.teacher_outputs_path()
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.exists():
        key = "distill.teacher_outputs" if cfg.distill.teacher_outputs else \
            f"{cfg.teacher_key(cfg.offline_teacher())}.teacher_outputs"
        raise ConfigError(f"{key}: {path} does not exist (write it with `raydistill teacher-logits CONFIG`)")
    return path.resolve()
