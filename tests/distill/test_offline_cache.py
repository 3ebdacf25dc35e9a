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
from raydistill.distill.offline import check_teacher_outputs, decoded_bytes, expected_teacher_hash, use_tail
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


def _lm_shard(d, k, rows, seq, vocab=300, start=0):
    """A causal-LM cache shard (q8, with a tail) of random outputs, rows [start, start + rows); the checked
    CacheInfo of ``d``."""
    from raydistill.data.topk_cache import open_cache

    rng = np.random.default_rng()
    v, i, t = (a.numpy() for a in topk_from_logits(torch.from_numpy(rng.standard_normal((rows, seq, vocab))), k, 1.0))
    meta = CacheMeta(codec=CodecSpec(name="q8").resolved(k, vocab).to_dict(), k=k, vocab_size=vocab, task="causal_lm",
                     tokens_per_row=seq, rows=rows, start=start, stop=start + rows, input_columns=["input_ids"],
                     tail_temperature=1.0)
    ids = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    write_shard(d / shard_name(start, start + rows), shard_table(meta, {"input_ids": ids}, v, i, t))
    return open_cache(d)


def test_decoded_bytes_is_what_a_decoded_shard_takes(tmp_path):
    from raydistill.data.topk_cache import read_shard
    from raydistill.distill.offline import decoded_bytes

    k, rows, seq = int(np.random.default_rng().integers(3, 40)), 6, 16
    info = _lm_shard(tmp_path, k, rows, seq)
    assert decoded_bytes(info) == sum(a.nbytes for a in read_shard(info.files[0]).values())


def test_workers_hold_the_decoded_cache_by_data_materialize_or_by_its_size(tmp_path, monkeypatch):
    """data.materialize set: as set; null (text): held up to OFFLINE_MATERIALIZE_MAX_BYTES decoded, not by the
    corpus's token count (a k = 128 cache is ~1.5 KB a token)."""
    from raydistill.distill import offline
    from raydistill.distill.offline import decoded_bytes, hold_in_memory

    info = _lm_shard(tmp_path, 8, 4, 16)
    size = decoded_bytes(info)
    lm = {m: load_config("lm_tiny", [f"data.materialize={m}"]) for m in ("null", "true", "false")}
    monkeypatch.setattr(offline, "OFFLINE_MATERIALIZE_MAX_BYTES", size)
    assert hold_in_memory(lm["null"], info) is True
    assert hold_in_memory(lm["false"], info) is False
    monkeypatch.setattr(offline, "OFFLINE_MATERIALIZE_MAX_BYTES", size - 1)
    assert hold_in_memory(lm["null"], info) is False
    assert hold_in_memory(lm["true"], info) is True
    mnist = _cfg(tmp_path)
    assert hold_in_memory(mnist, info) is True  # data.materialize: true, MNIST-1D's default
    assert hold_in_memory(_cfg(tmp_path, "data.materialize=false"), info) is False


@pytest.mark.parametrize("materialize", [True, False])
def test_an_offline_stage_is_split_in_the_caches_order(materialize):
    """The cache is read lazily: its rows reach the workers in shard order (preserve_order) whether they hold
    them or stream them, so the permutation of a worker that holds its rows is the same in every attempt."""
    from raydistill.distill.spec import StageSpec
    from raydistill.distill.stages import data_config

    spec = StageSpec(stage="s", task="causal_lm", kind="kd", model={}, epochs=1, batch_size=2, optimizer={},
                     lr_schedule={}, seed=0, progress_dir=".", materialize=materialize)
    from types import SimpleNamespace

    from ray.data import ExecutionOptions, ExecutionResources

    budget = int(np.random.default_rng().integers(1 << 20, 1 << 30))  # what read_dataset gave the cache
    train = SimpleNamespace(context=SimpleNamespace(execution_options=ExecutionOptions(
        resource_limits=ExecutionResources.for_limits(object_store_memory=budget))))
    online = data_config(spec, train)
    offline = data_config(spec.replace(offline_teacher="main"), train)
    opts = offline._user_execution_options["train"]
    assert opts.preserve_order is True and offline._enable_shard_locality is False
    # these options replace the dataset's own: they keep its bound on the decoded rows queued in the object store
    assert opts.resource_limits.object_store_memory == budget
    if materialize:  # an in-memory dataset held by the workers: Ray's default split
        assert online._user_execution_options is None
    else:  # a streamed corpus: Ray Data's own budget
        assert online._user_execution_options["train"].resource_limits.object_store_memory != budget


@pytest.mark.parametrize("temperature", [2.0, 4.0, 8.0])
def test_the_codec_companding_follows_the_loss_temperature(temperature):
    """codec_spec (the API's and the CLI's one rule): its exponent is matched to the temperature the loss
    reads the outputs at, so the decoded distribution at that temperature is closer to the exact one than
    with the exponent of T = 1 (measured: 3-8x closer at T = 2-8)."""
    from raydistill.data.topk_codec import decode_values, encode_values, fidelity
    from raydistill.distill.teacher_logits import codec_spec

    rng = np.random.default_rng()
    k, vocab = 32, 500
    v, i, _ = topk_from_logits(torch.from_numpy(rng.standard_normal((2000, vocab)) * 4), k, None)
    v, i = v.numpy(), i.numpy()

    def kl(spec_t):
        spec = codec_spec("q8", spec_t, value_levels=64).resolved(k, vocab)
        dec = decode_values(encode_values(v, spec), spec).reshape(v.shape)
        return fidelity(v, i, None, dec, i, None, temperature=temperature)["kl_topk"]

    assert 0 < kl(temperature) < kl(1.0) / 2
    with pytest.raises(ConfigError, match="--value-levels: value_levels"):
        codec_spec("q8", temperature, value_levels=300)
    with pytest.raises(ConfigError, match="--codec: codec must be one of"):
        codec_spec("zip", temperature)


def test_the_read_ahead_budget_is_a_number_of_decoded_shards(tmp_path, monkeypatch):
    """read_dataset's object-store budget: READ_AHEAD_SHARDS of the cache's largest shards decoded (what a
    decoded shard takes: decoded_bytes, checked above against read_shard), whatever the cache's length, and
    at least READ_AHEAD_MIN_BYTES."""
    from raydistill.data import topk_cache
    from raydistill.data.topk_cache import READ_AHEAD_SHARDS, read_ahead_bytes

    k, seq = int(np.random.default_rng().integers(3, 40)), 8
    infos = []
    for name, sizes in (("short", [3, 9]), ("long", [9, 3, 9, 9, 2, 9, 5])):
        (tmp_path / name).mkdir()
        start = 0
        for n in sizes:
            info = _lm_shard(tmp_path / name, k, n, seq, start=start)
            start += n
        infos.append(info)
    one_row = decoded_bytes(infos[0]) // infos[0].rows
    assert read_ahead_bytes(infos[0]) == read_ahead_bytes(infos[1]) == topk_cache.READ_AHEAD_MIN_BYTES
    monkeypatch.setattr(topk_cache, "READ_AHEAD_MIN_BYTES", 0)
    assert read_ahead_bytes(infos[0]) == read_ahead_bytes(infos[1]) == READ_AHEAD_SHARDS * 9 * one_row
