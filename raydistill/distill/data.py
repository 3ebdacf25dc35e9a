"""The datasets of each stage, from the config: the task's own (``Task.datasets``), with the train rows of a
distillation stage read from an offline teacher's top-k outputs when the job has one; the storage root.
"""

from __future__ import annotations

import os
from pathlib import Path

from raydistill.config import Config


def resolve_storage(storage_path: str | os.PathLike | None, cfg: Config | None = None) -> Path:
    p = storage_path or (cfg.run.storage_path if cfg is not None else None) or "runs"
    return Path(p).expanduser().resolve()


def task_info(cfg: Config, storage: Path) -> dict:
    from raydistill.tasks import get_task

    return get_task(cfg.data.task).task_info(cfg, storage)


def stage_datasets(cfg: Config, storage: Path, kind: str) -> tuple[dict, int]:
    """``{"train", "eval"}`` Ray datasets of a stage and its train rows: ``kind`` ``ce`` the labelled rows,
    ``kd`` the distillation rows (with the transfer set where the task has one), or the offline teacher's
    top-k outputs (``teacher_outputs``), which hold the rows themselves: checked against the config (and the
    tokenizer, where the task has one), read and decoded by Ray Data (``raydistill.distill.offline``)."""
    from raydistill.tasks import get_task

    task = get_task(cfg.data.task)
    offline = kind == "kd" and cfg.teacher_outputs_path() is not None
    datasets, rows = task.datasets(cfg, storage, transfer=kind == "kd" and not offline)
    if offline:
        from raydistill.distill.offline import offline_dataset

        ds, rows = offline_dataset(cfg, task.task_info(cfg, storage).get("tokenizer_dir"))
        # read + decoded now, by Ray Data tasks into the object store (the driver holds references only),
        # before the trainer's workers hold their CPUs: on a small node the read tasks of a lazy dataset can
        # wait forever behind the workers and any actor still holding a fraction of a CPU
        datasets["train"] = ds.materialize()
    return datasets, rows


def distill_rows(cfg: Config, storage: Path) -> int:
    """The train rows of the distillation stages (the baseline matches their optimizer steps)."""
    if cfg.teacher_outputs_path() is not None:
        from raydistill.distill.offline import check_teacher_outputs

        return check_teacher_outputs(cfg).rows
    from raydistill.tasks import get_task

    return get_task(cfg.data.task).train_rows(cfg, storage, transfer=True)
