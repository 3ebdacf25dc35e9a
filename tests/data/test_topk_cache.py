"""The teacher-output shard format (raydistill.data.topk_cache) without Ray: round trips of both codecs,
self-description, and every kind of bad cache (truncated / corrupted shards, unknown versions, mixed or
incomplete directories, a cache of another teacher / tokenizer / k), each named in the error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raydistill.data.topk_cache import (
    META_KEY,
    REPORT_FILE,
    CacheError,
    CacheMeta,
    check_cache,
    decode_batch,
    open_cache,
    read_meta,
    read_shard,
    read_shards,
    shard_name,
    shard_plan,
    shard_table,
    write_shard,
)
from raydistill.data.topk_codec import CodecSpec, fidelity, topk_from_logits

V, K, S = 300, 24, 8


def _outputs(rng, rows, tail_t=1.0):
    logits = torch.from_numpy(rng.standard_normal((rows, S, V)) * 3)
    v, i, t = topk_from_logits(logits, K, tail_t)
    return v.numpy(), i.numpy(), None if t is None else t.numpy()


def _meta(codec="q8", start=0, stop=5, tail_t=1.0, **kw) -> CacheMeta:
    spec = CodecSpec(name=codec).resolved(K, V)
    return CacheMeta(codec=spec.to_dict(), k=K, vocab_size=V, task="causal_lm", tokens_per_row=S, rows=stop - start,
                     start=start, stop=stop, input_columns=["input_ids"], teacher_hash="t1", tokenizer_hash="tok1",
                     tail_temperature=tail_t, **kw)


def _write(d: Path, start, stop, rng, codec="q8", tail_t=1.0, **kw):
    ids = rng.integers(0, V, (stop - start, S)).astype(np.int32)
    v, i, t = _outputs(rng, stop - start, tail_t)
    meta = _meta(codec, start, stop, tail_t, **kw)
    path = d / shard_name(start, stop)
    write_shard(path, shard_table(meta, {"input_ids": ids}, v, i, t))
    return path, ids, v, i, t


@pytest.mark.parametrize("codec", ["cm", "q8", "raw"])
@pytest.mark.parametrize("tail", [True, False])
def test_shard_round_trip(tmp_path, codec, tail):
    rng = np.random.default_rng()
    path, ids, v, i, t = _write(tmp_path, 0, 5, rng, codec, 1.0 if tail else None)
    meta = read_meta(path)
    assert meta.spec.name == codec and meta.k == K and meta.rows == 5 and meta.has_tail == tail
    out = read_shard(path)
    np.testing.assert_array_equal(out["input_ids"], ids)
    assert out["input_ids"].dtype == np.int64 and out["topk_indices"].dtype == np.int64
    assert out["topk_values"].shape == out["topk_indices"].shape == (5, S, K)
    assert ("topk_tail" in out) == tail
    np.testing.assert_array_equal(np.sort(out["topk_indices"], -1), np.sort(i, -1))
    fid = fidelity(v.reshape(-1, K), i.reshape(-1, K), None if t is None else t.reshape(-1),
                   out["topk_values"].reshape(-1, K), out["topk_indices"].reshape(-1, K),
                   out.get("topk_tail", np.zeros(0)).reshape(-1) if tail else None)
    if codec == "raw":
        assert fid["kl_topk"] == pytest.approx(0.0, abs=1e-9)
        np.testing.assert_array_equal(out["topk_values"], np.take_along_axis(v, np.argsort(i, -1), -1))
    else:
        assert 0 < fid["kl_topk"] < 2e-3
    if tail:
        assert fid["kl_with_tail"] < 2e-3
        assert out["topk_tail"].shape == (5, S) and "topk_tail" not in read_shard(path, tail=False)


def test_cm_shard_decodes_whole_and_matches_q8(tmp_path):
    """cm and q8 shards of the same outputs decode to the same ids and values; a batch of a cm shard's rows that
    does not start at its first row (where the stream is) is refused, naming the file; damage names the file."""
    import pyarrow as pa

    (tmp_path / "q8").mkdir()
    (tmp_path / "cm").mkdir()
    pq8, *_ = _write(tmp_path / "q8", 0, 30, np.random.default_rng(3), "q8")
    pcm, *_ = _write(tmp_path / "cm", 0, 30, np.random.default_rng(3), "cm")
    a, b = read_shard(pq8), read_shard(pcm)
    for c in ("input_ids", "topk_indices", "topk_values", "topk_tail"):
        np.testing.assert_array_equal(a[c], b[c])
    table = pq.read_table(pcm)
    meta = read_meta(pcm)
    batch = {"input_ids": np.asarray(table.column("input_ids").to_pylist()),
             "topk_cm": table.column("topk_cm").slice(5)}
    batch["input_ids"] = batch["input_ids"][5:]
    with pytest.raises(CacheError, match=f"{pcm.name}: a 'cm' shard is decoded whole"):
        decode_batch(batch, meta, source=str(pcm))
    # a flipped byte in the stream (parquet written without page checksums, so the codec's own CRC speaks)
    col = table.column("topk_cm").to_pylist()
    bad = bytearray(col[0])
    bad[len(bad) // 2] ^= 0xFF
    t2 = table.set_column(table.column_names.index("topk_cm"), "topk_cm",
                          pa.array([bytes(bad)] + col[1:], pa.large_binary()))
    pq.write_table(t2, pcm)
    with pytest.raises(CacheError, match=f"{pcm.name}: corrupted top-k payload: .*CRC-32 mismatch"):
        read_shard(pcm)


@pytest.mark.parametrize("codec", ["cm", "raw"])
def test_read_shards_in_threads_keeps_the_row_order(tmp_path, codec):
    """Shards of different sizes read side by side in threads give the rows of reading them one after another, in
    the order of the paths (also when that is not the order of their names); the failing shard is named; bad
    ``threads`` / ``paths`` are ValueErrors."""
    rng = np.random.default_rng(11)
    written = [_write(tmp_path, a, b, rng, codec) for a, b in ((0, 7), (7, 10), (10, 22), (22, 23))]
    paths = [w[0] for w in written]
    for order in (paths, paths[::-1]):
        one = [read_shard(p) for p in order]
        for threads in (1, 2, 3, 8):
            got = read_shards(order, threads=threads)
            assert set(got) == set(one[0])
            for c in got:
                np.testing.assert_array_equal(got[c], np.concatenate([o[c] for o in one]))
    got = read_shards(paths, threads=2, tail=False)
    np.testing.assert_array_equal(got["input_ids"], np.concatenate([w[1] for w in written]))
    np.testing.assert_array_equal(got["topk_indices"].reshape(-1, K),
                                  np.sort(np.concatenate([w[3] for w in written]).reshape(-1, K), -1))
    assert "topk_tail" not in got
    bad = paths[2]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(CacheError, match=bad.name):
        read_shards(paths, threads=2)
    for threads in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            read_shards(paths[:2], threads=threads)
    with pytest.raises(ValueError, match="paths: no shard"):
        read_shards([], threads=2)


def test_q8_shard_without_the_new_codec_fields_still_reads(tmp_path):
    """A q8 shard written before cm existed (its codec metadata without chunk_tokens / codec_version)."""
    path, ids, v, i, t = _write(tmp_path, 0, 5, np.random.default_rng(1), "q8")
    table = pq.read_table(path)
    d = json.loads(table.schema.metadata[META_KEY])
    codec = {key: d["codec"][key] for key in ("name", "value_levels", "gamma", "index_coding", "target_kl")}
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps({**d, "codec": codec}).encode()}), path)
    out = read_shard(path)
    np.testing.assert_array_equal(out["topk_indices"], np.sort(i, -1))
    assert read_meta(path).spec.codec_version == 1


def test_q8_is_much_smaller_than_raw(tmp_path):
    rng = np.random.default_rng(0)
    q8, *_ = _write(tmp_path, 0, 40, rng, "q8")
    (tmp_path / "raw").mkdir()
    raw, *_ = _write(tmp_path / "raw", 0, 40, np.random.default_rng(0), "raw")
    assert q8.stat().st_size * 3 < raw.stat().st_size


def test_shard_bytes_are_deterministic(tmp_path):
    """The same rows, teacher outputs and codec give byte-identical shards (what resuming relies on)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    pa_, *_ = _write(a, 5, 10, np.random.default_rng(7))
    pb_, *_ = _write(b, 5, 10, np.random.default_rng(7))
    assert pa_.read_bytes() == pb_.read_bytes()


def test_open_cache_checks_every_shard(tmp_path):
    rng = np.random.default_rng()
    for a, b in shard_plan(12, 5):
        _write(tmp_path, a, b, rng)
    info = open_cache(tmp_path)
    assert info.rows == 12 and len(info.files) == 3 and info.meta.k == K
    check_cache(info, k=K, teacher_hash="t1", tokenizer_hash="tok1", vocab_size=V, task="causal_lm")
    cases = [({"k": 16}, "distill.topk = 24.*asks for 16"), ({"teacher_hash": "t2"}, "the teacher"),
             ({"tokenizer_hash": "tok2"}, "the tokenizer"), ({"task": "classification"}, "task")]
    for kw, pat in cases:
        with pytest.raises(CacheError, match=f"distill.teacher_outputs: .*{shard_name(0, 5)}.*{pat}"):
            check_cache(info, **kw)


def test_bad_caches_name_the_file(tmp_path):
    rng = np.random.default_rng()
    with pytest.raises(CacheError, match="does not exist"):
        open_cache(tmp_path / "nope")
    with pytest.raises(CacheError, match="holds no parquet shards"):
        open_cache(tmp_path)
    p0, *_ = _write(tmp_path, 0, 5, rng)
    p1, *_ = _write(tmp_path, 5, 10, rng)
    good = p1.read_bytes()

    # truncated: the footer is gone
    p1.write_bytes(good[: len(good) // 2])
    with pytest.raises(CacheError, match=f"{p1.name}: not a readable parquet file"):
        open_cache(tmp_path)
    # a report that recorded the size catches a file cut or changed in place
    p1.write_bytes(good)
    (tmp_path / REPORT_FILE).write_text(json.dumps({"shards": [{"file": p1.name, "bytes": len(good) + 1}]}))
    with pytest.raises(CacheError, match=f"{p1.name} is {len(good)} bytes, the run wrote {len(good) + 1}"):
        open_cache(tmp_path)
    (tmp_path / REPORT_FILE).unlink()
    # corrupted data pages: the page checksums catch it when the shard is read
    bad = bytearray(good)
    mid = len(bad) // 3
    bad[mid:mid + 64] = bytes(64)
    p1.write_bytes(bytes(bad))
    with pytest.raises(CacheError, match=f"{p1.name}"):
        read_shard(p1)
    p1.write_bytes(good)
    # a missing shard (an unfinished run) and a shard named for another range
    p1.unlink()
    _write(tmp_path, 7, 10, rng)
    with pytest.raises(CacheError, match=r"rows \[5, 7\) missing"):
        open_cache(tmp_path)
    os.rename(tmp_path / shard_name(7, 10), tmp_path / shard_name(5, 10))
    with pytest.raises(CacheError, match="named for another range"):
        open_cache(tmp_path)


def test_unknown_version_and_bad_metadata(tmp_path):
    rng = np.random.default_rng()
    path, *_ = _write(tmp_path, 0, 5, rng)
    table = pq.read_table(path)
    d = json.loads(table.schema.metadata[META_KEY])
    for change, pat in (({"version": 2}, "version 2 is not supported"), ({"format": "x"}, "not a raydistill.topk_cache"),
                        ({"codec": {**d["codec"], "name": "zip"}}, "bad .* metadata: codec must be one of"),
                        ({"rows": 6}, "holds 5 rows, its metadata says 6"),
                        ({"codec": {**d["codec"], "codec_version": 9}}, "codec 'q8' version 9 is not supported")):
        pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps({**d, **change}).encode()}), path)
        with pytest.raises(CacheError, match=f"{path.name}: .*{pat}"):
            read_meta(path)
    pq.write_table(table.replace_schema_metadata({META_KEY: b"{not json"}), path)
    with pytest.raises(CacheError, match="not valid JSON"):
        read_meta(path)


def test_shards_of_different_runs_are_refused(tmp_path):
    rng = np.random.default_rng()
    _write(tmp_path, 0, 5, rng)
    _write(tmp_path, 5, 10, rng, tail_t=2.0)
    with pytest.raises(CacheError, match=r"differs from .* in \['tail_temperature'\]"):
        open_cache(tmp_path)


def test_pre_metadata_format_is_read_as_it_is(tmp_path):
    """Caches written before the format (raw logits + int64 ids, no metadata) still work."""
    from raydistill.data.ray_data import arrays_to_table

    rng = np.random.default_rng()
    logits = rng.standard_normal((4, S, V)).astype(np.float32)
    vals = -np.sort(-logits, -1)[..., :K]
    idx = np.argsort(-logits, -1)[..., :K].astype(np.int64)
    ids = rng.integers(0, V, (4, S))
    pq.write_table(arrays_to_table(input_ids=ids, topk_values=vals, topk_indices=idx), tmp_path / "old.parquet")
    info = open_cache(tmp_path)
    assert info.meta is None and info.rows == 4
    batch = {"input_ids": ids, "topk_values": vals, "topk_indices": idx, "path": np.array(["x"] * 4)}
    out = decode_batch(batch, None)
    assert set(out) == {"input_ids", "topk_values", "topk_indices"}
    check_cache(info, k=7)  # nothing recorded to check against


def test_classification_rows(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((30, 40)).astype(np.float32)
    y = rng.integers(-1, 10, 30)
    v, i, t = (a.numpy() for a in topk_from_logits(torch.from_numpy(rng.standard_normal((30, 10))), 4, 2.0))
    spec = CodecSpec().resolved(4, 10)
    meta = CacheMeta(codec=spec.to_dict(), k=4, vocab_size=10, task="classification", tokens_per_row=1, rows=30,
                     start=0, stop=30, input_columns=["x", "y"], tail_temperature=2.0)
    write_shard(tmp_path / shard_name(0, 30), shard_table(meta, {"x": x, "y": y}, v, i, t))
    out = read_shard(tmp_path / shard_name(0, 30))
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["y"], y)
    assert out["topk_values"].shape == (30, 4) and out["topk_tail"].shape == (30,)
    np.testing.assert_array_equal(out["topk_indices"], np.sort(i, 1))
    # the teacher's top-1 is the argmax of the values (the ids come back sorted by id, not by value)
    from raydistill.tasks.classification import offline_argmax

    top1 = offline_argmax({k: torch.as_tensor(out[k]) for k in ("topk_values", "topk_indices")}).numpy()
    exact = np.take_along_axis(v, np.argsort(i, 1), 1)  # the exact values in id order
    chosen = exact[np.arange(30), np.argmax(out["topk_values"], 1)]
    step = 1 / (meta.spec.value_levels - 1)  # a quantisation step of p ** gamma: near-ties may swap
    assert (np.exp(meta.spec.gamma * exact.max(1)) - np.exp(meta.spec.gamma * chosen) <= step).all()
    assert (top1 == i[:, 0]).mean() > 0.8
