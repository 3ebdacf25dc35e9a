"""The datasets of each stage, from the config: MNIST-1D arrays (labelled rows, the transfer set, offline
teacher outputs) or the packed text corpus, as Ray Data datasets; the storage root and the task's
``task_info``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from raydistill.config import Config, ConfigError

def resolve_storage(storage_path: str | os.PathLike | None, cfg: Config | None = None) -> Path:
    p = storage_path or (cfg.run.storage_path if cfg is not None else None) or "runs"
    return Path(p).expanduser().resolve()


def data_cache(storage: Path) -> Path:
    return storage / "datasets"


def load_arrays(cfg: Config, storage: Path):
    from raydistill.data import load_mnist1d, load_transfer_set

    split = load_mnist1d(cfg.data, data_cache(storage))
    transfer = load_transfer_set(cfg.data, cfg.distill.transfer_set, data_cache(storage))
    return split, transfer


def _eval_datasets(split) -> dict:
    from raydistill.data import to_ray_dataset

    # one small dataset (split column: 0 = val, 1 = test) -> one Ray Data execution per worker start
    return {"eval": to_ray_dataset(
        x=np.concatenate([split.x_val, split.x_test]), y=np.concatenate([split.y_val, split.y_test]),
        split=np.concatenate([np.zeros(len(split.y_val), np.int64), np.ones(len(split.y_test), np.int64)]))}


def labelled_datasets(cfg: Config, storage: Path) -> tuple[dict, int]:
    from raydistill.data import to_ray_dataset

    split, _ = load_arrays(cfg, storage)
    return {"train": to_ray_dataset(x=split.x_train, y=split.y_train), **_eval_datasets(split)}, len(split.y_train)


def distill_datasets(cfg: Config, storage: Path) -> tuple[dict, int]:
    """Labelled train rows + unlabelled transfer rows (``y = -1``), or the offline teacher-output parquet."""
    from raydistill.data import to_ray_dataset
    from raydistill.data.ray_data import UNLABELLED

    split, transfer = load_arrays(cfg, storage)
    if cfg.distill.teacher_outputs:
        from raydistill.distill.offline import offline_dataset

        ds, rows = offline_dataset(cfg)  # checked, streamed and decoded by Ray Data
        return {"train": ds, **_eval_datasets(split)}, rows
    x = np.concatenate([split.x_train, transfer])
    y = np.concatenate([split.y_train, np.full(len(transfer), UNLABELLED, np.int64)])
    return {"train": to_ray_dataset(x=x, y=y), **_eval_datasets(split)}, len(y)


def text_data(cfg: Config, storage: Path):
    """Causal LM: the tokenized, packed corpus (Ray Data; cached) -- see ``raydistill.data.text``."""
    from raydistill.data.text import prepare_text
    from raydistill.models.hf import check_vocab, hf_config_dict

    # one tokenizer and one packed corpus per storage root, shared by the teacher cache and every run
    root = resolve_storage(cfg.run.storage_path) if cfg.run.storage_path else storage
    td = prepare_text(cfg.data, root)
    for key, spec in (("teacher", cfg.teacher), ("student", cfg.student)):
        if spec.model == "hf":  # a trained BPE may be smaller than data.vocab_size: check again
            conf = hf_config_dict(spec.kwargs)
            try:
                check_vocab(f"{key}.kwargs", conf.get("vocab_size"), td.vocab_size)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    return td


def task_info(cfg: Config, storage: Path) -> dict:
    if cfg.data.task != "causal_lm":
        return {}
    td = text_data(cfg, storage)
    return {**td.info(), "seq_len": cfg.data.seq_len}


def lm_datasets(cfg: Config, storage: Path) -> tuple[dict, int]:
    """Packed ``input_ids`` blocks: train, and one eval dataset (split column: 0 = val, 1 = test)."""
    from raydistill.data import to_ray_dataset

    td = text_data(cfg, storage)
    ev = np.concatenate([td.val, td.test])
    split = np.concatenate([np.zeros(len(td.val), np.int64), np.ones(len(td.test), np.int64)])
    eval_ds = {"eval": to_ray_dataset(input_ids=ev.astype(np.int64), split=split)}
    if cfg.distill.teacher_outputs:
        from raydistill.distill.offline import offline_dataset

        ds, rows = offline_dataset(cfg, td.tokenizer_dir)  # checked, streamed and decoded by Ray Data
        return {"train": ds, **eval_ds}, rows
    return {"train": to_ray_dataset(input_ids=td.train.astype(np.int64)), **eval_ds}, len(td.train)


def stage_datasets(cfg: Config, storage: Path, kind: str) -> tuple[dict, int]:
    if cfg.data.task == "causal_lm":
        if kind == "ce":
            return lm_datasets(cfg.model_copy(update={"distill": cfg.distill.model_copy(
                update={"teacher_outputs": None})}), storage)
        return lm_datasets(cfg, storage)
    return labelled_datasets(cfg, storage) if kind == "ce" else distill_datasets(cfg, storage)


# ----------------------------------------------------------------------------------------------------


def distill_rows(cfg: Config, storage: Path) -> int:
    if cfg.data.task == "causal_lm" and not cfg.distill.teacher_outputs:
        return len(text_data(cfg, storage).train)
    if cfg.distill.teacher_outputs:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in _parquet_files(cfg.distill.teacher_outputs))
    return int(cfg.data.num_train - max(1, round(cfg.data.num_train * cfg.data.val_fraction))
               + cfg.distill.transfer_set.size)


def _parquet_files(path) -> list[Path]:
    p = Path(path)
    return sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
