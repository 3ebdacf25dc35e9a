"""An offline teacher-output cache (``distill.teacher_outputs`` or a teacher's ``teacher_outputs``): checking
it against the config, and reading it.

    check_teacher_outputs(cfg, tokenizer_dir=None)   the cache's shards (footers, metadata, sizes, row
                                                     coverage) and that they were written for this config's
                                                     task, k, teacher and tokenizer; ConfigError otherwise
    use_tail(cfg, meta)                              whether the loss gets the cache's tail
    offline_dataset(cfg, tokenizer_dir=None)         (Ray dataset streaming + decoding the shards, CacheInfo)
    hold_in_memory(cfg, info)                        whether workers hold the decoded cache or stream it

The checks without ``tokenizer_dir`` read only the shards' footers and run before Ray starts (preflight);
the dataset builders call them again with the tokenizer once it is known (before any training starts).
"""

from __future__ import annotations

import logging
from pathlib import Path

from raydistill.config import Config, ConfigError, config_hash
from raydistill.distill.spec import teacher_hash
from raydistill.data.topk_cache import (CacheError, CacheInfo, CacheMeta, check_cache, decoded_bytes, open_cache,
                                       tokenizer_hash)

log = logging.getLogger("raydistill")

# data.materialize unset: workers hold the decoded cache in memory up to this size (all workers together)
OFFLINE_MATERIALIZE_MAX_BYTES = 1 << 30


def expected_teacher_hash(cfg: Config) -> str | None:
    """The teacher identity ``raydistill teacher-logits`` records for the offline teacher of this config (the
    hash of that teacher trained here, or of its external ``checkpoint``; None when that checkpoint is
    missing, which its own check reports)."""
    name = cfg.offline_teacher()
    ck = cfg.teacher_map()[name].checkpoint
    if ck:
        path = Path(ck).expanduser().resolve()
        return config_hash({"checkpoint": str(path), "mtime": path.stat().st_mtime}) if path.exists() else None
    return teacher_hash(cfg, name)


def check_teacher_outputs(cfg: Config, tokenizer_dir=None) -> CacheInfo:
    return _checked(cfg, tokenizer_dir)[0]


def _checked(cfg: Config, tokenizer_dir=None) -> tuple[CacheInfo, bool]:
    """The checked cache and :func:`use_tail`'s answer for it (its tail check, and warning, run once)."""
    key = cfg.teacher_outputs_key()
    try:
        info = open_cache(cfg.teacher_outputs_path(), key=key)
        check_cache(info, task=cfg.data.task, k=int(cfg.distill.topk), teacher_hash=expected_teacher_hash(cfg),
                    tokenizer_hash=tokenizer_hash(tokenizer_dir) if tokenizer_dir else None, key=key)
    except CacheError as exc:
        raise ConfigError(str(exc)) from None
    return info, use_tail(cfg, info.meta, info.files[0])


def _offline_temperatures(cfg: Config) -> dict[float, str]:
    """The temperatures of the ``kd_logits`` terms that read the offline teacher, each with the key that sets
    it (``distill.temperature``, or a term's own ``distill.terms.<i>.temperature``)."""
    name = cfg.offline_teacher()
    own = {f"distill.terms.{i}": t.temperature for i, t in enumerate(cfg.distill.terms or [])
           if getattr(t, "temperature", None) is not None}
    return {float(t["temperature"]): f"{t['key']}.temperature" if t["key"] in own else "distill.temperature"
            for t in cfg.loss_terms()
            if t["type"] == "kd_logits" and float(t["weight"]) > 0 and name in t["teachers"]}


def use_tail(cfg: Config, meta: CacheMeta | None, file=None) -> bool:
    """``distill.topk_tail``: None uses the cache's tail when it has one at the temperature of the logit terms
    that read it (``distill.temperature`` unless ``distill.terms`` say otherwise); true requires it; false
    leaves it out. The tail is the mass outside the top-k at the temperature it was written for and cannot
    be rescaled to another one from the top-k alone."""
    want = cfg.distill.topk_tail
    has = meta is not None and meta.has_tail
    where = file or cfg.teacher_outputs_key()
    if want is False:
        return False
    if not has:
        if want:
            raise ConfigError(f"distill.topk_tail: true, but {where} has no tail (written with --no-tail, "
                              "k equal to the vocabulary, or before the tail existed); rerun `raydistill "
                              "teacher-logits` or set distill.topk_tail=false")
        return False
    t_cache = float(meta.tail_temperature)
    other = sorted((t, key) for t, key in _offline_temperatures(cfg).items() if abs(t_cache - t) > 1e-9 * max(1.0, t))
    if other:
        t_loss, key = other[0]
        msg = (f"{key} is {t_loss:g} but the tail in {where} is "
               f"the teacher's mass outside the top-k at temperature {t_cache:g} (tail_temperature), which cannot "
               "be rescaled to another temperature; write the cache with `raydistill teacher-logits "
               f"--tail-temperature {t_loss:g}`, or set distill.topk_tail=false")
        if want:
            raise ConfigError(msg)
        log.warning("%s; distilling without the tail", msg)
        return False
    return True


def offline_dataset(cfg: Config, tokenizer_dir=None):
    """The checked cache as a lazy Ray dataset (shards streamed and decoded in Ray Data tasks) and the
    :class:`CacheInfo` it reads."""
    from raydistill.data.topk_cache import read_dataset

    info, tail = _checked(cfg, tokenizer_dir)
    return read_dataset(info, tail=tail), info


def hold_in_memory(cfg: Config, info: CacheInfo) -> bool:
    """Whether the workers hold their shard of the decoded cache in memory (after one streamed pass) or
    stream it every epoch: ``data.materialize`` when set; unset (null), held when the decoded cache is at
    most ``OFFLINE_MATERIALIZE_MAX_BYTES`` (top-k outputs take about ``12 k`` bytes a token, so the corpus's
    own size rule would hold a k = 128 cache of a 4M-token corpus, 6 GB, in memory)."""
    want = getattr(cfg.data, "materialize", True)
    if want is not None:
        return bool(want)
    return decoded_bytes(info) <= OFFLINE_MATERIALIZE_MAX_BYTES
