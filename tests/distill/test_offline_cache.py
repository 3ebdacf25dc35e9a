"""distill.teacher_outputs against the config, before Ray starts (raydistill.distill.offline): a cache of
another k, teacher or tokenizer, a tail at another temperature, distill.topk_tail."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from raydistill.config import ConfigError, load_config
from raydistill.data.topk_cache import CacheMeta, shard_name, shard_table, write_shard
from raydistill.data.topk_codec import CodecSpec, topk_from_logits
from raydistill.distill.offline import check_teacher_outputs, expected_teacher_hash, use_tail
from raydistill.distill.teachers import teacher_hash


def _cache(d, cfg, *, k=4, tail_t=4.0, teacher=None, tokenizer=None):
    v, i, t = (None if a is None else a.numpy() for a in topk_from_logits(torch.randn(12, 10), k, tail_t))
    meta = CacheMeta(codec=CodecSpec().resolved(k, 10).to_dict(), k=k, vocab_size=10, task="classification",
                     tokens_per_row=1, rows=12, start=0, stop=12, input_columns=["x", "y"],
                     teacher_hash=teacher or teacher_hash(cfg), tokenizer_hash=tokenizer, tail_temperature=tail_t)
    write_shard(d / shard_name(0, 12), shard_table(meta, {"x": np.zeros((12, 40), np.float32),
                                                          "y": np.zeros(12, np.int64)}, v, i, t))


def _cfg(d, *extra):
    return load_config(None, [f"distill.teacher_outputs={d}", "distill.topk=4", "distill.temperature=4", *extra])


def test_matching_cache_passes_and_uses_its_tail(tmp_path):
    cfg = _cfg(tmp_path)
    _cache(tmp_path, cfg)
    info = check_teacher_outputs(cfg)
    assert info.rows == 12 and info.meta.has_tail
    assert use_tail(cfg, info.meta) is True
    assert use_tail(_cfg(tmp_path, "distill.topk_tail=false"), info.meta) is False
    assert expected_teacher_hash(cfg) == info.meta.teacher_hash


def test_mismatches_are_config_errors_naming_the_key_and_file(tmp_path):
    cfg = _cfg(tmp_path)
    _cache(tmp_path, cfg)
    f = shard_name(0, 12)
    for extra, pat in ((["distill.topk=3"], f"distill.teacher_outputs: .*{f} was written for distill.topk = 4"),
                       (["run.seed=7"], f"{f} was written for the teacher"),
                       (["distill.temperature=2", "distill.topk_tail=true"],
                        "distill.temperature is 2 but the tail .* at temperature 4")):
        with pytest.raises(ConfigError, match=pat):
            check_teacher_outputs(_cfg(tmp_path, *extra))


def test_tail_at_another_temperature_is_left_out_with_a_warning(tmp_path):
    cfg = _cfg(tmp_path, "distill.temperature=2")
    _cache(tmp_path, _cfg(tmp_path))
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("raydistill")
    logger.addHandler(handler)
    try:
        info = check_teacher_outputs(cfg)
        assert use_tail(cfg, info.meta) is False
    finally:
        logger.removeHandler(handler)
    assert any("distilling without the tail" in m for m in seen)


def test_topk_tail_true_needs_a_tail(tmp_path):
    cfg = _cfg(tmp_path, "distill.topk_tail=true")
    _cache(tmp_path, _cfg(tmp_path), tail_t=None)
    with pytest.raises(ConfigError, match="distill.topk_tail: true, but .* has no tail"):
        check_teacher_outputs(cfg)


def test_a_named_teachers_cache_is_checked_against_that_teacher_and_its_terms(tmp_path):
    """``teachers.<name>.teacher_outputs`` (the seam's several teachers): the cache must be that teacher's
    (not the first's), errors name its key, and the tail's temperature is checked against the temperature of
    the kd_logits terms that read it, naming the term's own key."""
    main = json.dumps(load_config(None).teacher.model_dump(mode="json"))  # the first of teachers is `teacher`
    two = f"teachers={{main: {main}, big: {{model: mlp, kwargs: {{hidden: 64}}, teacher_outputs: '{tmp_path}'}}}}"
    terms = "distill.terms=[{type: kd_logits, teachers: {main: 1, big: 1}, temperature: %s}, {type: ce}]"

    def cfg_with(t, *extra):
        return load_config(None, [two, terms % t, "distill.topk=4", *extra])

    cfg = cfg_with(4)
    assert cfg.offline_teacher() == "big" and cfg.teacher_outputs_key() == "teachers.big.teacher_outputs"
    _cache(tmp_path, cfg, teacher=teacher_hash(cfg, "big"))
    info = check_teacher_outputs(cfg)
    assert use_tail(cfg, info.meta) is True and expected_teacher_hash(cfg) == teacher_hash(cfg, "big")
    with pytest.raises(ConfigError, match="distill.terms.0.temperature is 2 but the tail .* at temperature 4"):
        check_teacher_outputs(cfg_with(2, "distill.topk_tail=true"))
    for d in tmp_path.glob("*.parquet"):
        d.unlink()
    _cache(tmp_path, cfg)  # the first teacher's outputs under the second's key
    with pytest.raises(ConfigError, match=f"teachers.big.teacher_outputs: .*{shard_name(0, 12)} was written for "
                                          "the teacher"):
        check_teacher_outputs(cfg)
