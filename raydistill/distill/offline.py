"""``distill.teacher_outputs``: checking an offline teacher-output cache against the config, and reading it.

    check_teacher_outputs(cfg, tokenizer_dir=None)   the cache's shards (footers, metadata, sizes, row
                                                     coverage) and that they were written for this config's
                                                     task, k, teacher and tokenizer; ConfigError otherwise
    use_tail(cfg, meta)                              whether the loss gets the cache's tail
    offline_dataset(cfg, tokenizer_dir=None)         (Ray dataset streaming + decoding the shards, rows)

The checks without ``tokenizer_dir`` read only the shards' footers and run before Ray starts (preflight);
the dataset builders call them again with the tokenizer once it is known (before any training starts).
"""

from __future__ import annotations

import logging
from pathlib import Path

from raydistill.config import Config, ConfigError, config_hash
from raydistill.data.topk_cache import CacheError, CacheInfo, CacheMeta, check_cache, open_cache, tokenizer_hash

log = logging.getLogger("raydistill")
KEY = "distill.teacher_outputs"


def expected_teacher_hash(cfg: Config) -> str | None:
    """The teacher identity ``raydistill teacher-logits`` records for this config (the cached teacher's hash,
    or the external ``teacher.checkpoint``'s; None when that checkpoint is missing, which its own check
    reports)."""
    from raydistill.distill.teachers import teacher_hash

    if cfg.teacher.checkpoint:
        path = Path(cfg.teacher.checkpoint).expanduser().resolve()
        return config_hash({"checkpoint": str(path), "mtime": path.stat().st_mtime}) if path.exists() else None
    return teacher_hash(cfg)


def check_teacher_outputs(cfg: Config, tokenizer_dir=None) -> CacheInfo:
    try:
        info = open_cache(cfg.distill.teacher_outputs, key=KEY)
        check_cache(info, task=cfg.data.task, k=int(cfg.distill.topk), teacher_hash=expected_teacher_hash(cfg),
                    tokenizer_hash=tokenizer_hash(tokenizer_dir) if tokenizer_dir else None, key=KEY)
    except CacheError as exc:
        raise ConfigError(str(exc)) from None
    use_tail(cfg, info.meta, info.files[0])
    return info


def use_tail(cfg: Config, meta: CacheMeta | None, file=None) -> bool:
    """``distill.topk_tail``: None uses the cache's tail when it has one at ``distill.temperature``; true
    requires it; false leaves it out. The tail is the mass outside the top-k at the temperature it was
    written for and cannot be rescaled to another one from the top-k alone."""
    want = cfg.distill.topk_tail
    has = meta is not None and meta.has_tail
    if want is False:
        return False
    if not has:
        if want:
            raise ConfigError(f"distill.topk_tail: true, but {file or KEY} has no tail (written with --no-tail, "
                              "k equal to the vocabulary, or before the tail existed); rerun `raydistill "
                              "teacher-logits` or set distill.topk_tail=false")
        return False
    t_cache, t_loss = float(meta.tail_temperature), float(cfg.distill.temperature)
    if abs(t_cache - t_loss) > 1e-9 * max(1.0, t_loss):
        msg = (f"distill.temperature is {t_loss:g} but the tail in {file or KEY} is the teacher's mass outside the "
               f"top-k at temperature {t_cache:g} (tail_temperature), which cannot be rescaled to another "
               "temperature; write the cache with `raydistill teacher-logits --tail-temperature "
               f"{t_loss:g}`, or set distill.topk_tail=false")
        if want:
            raise ConfigError(msg)
        log.warning("%s; distilling without the tail", msg)
        return False
    return True


def offline_dataset(cfg: Config, tokenizer_dir=None):
    """The checked cache as a Ray dataset (shards streamed and decoded in Ray Data ``map_batches``) and its
    number of rows."""
    from raydistill.data.topk_cache import read_dataset

    info = check_teacher_outputs(cfg, tokenizer_dir)
    return read_dataset(info, tail=use_tail(cfg, info.meta)), info.rows
