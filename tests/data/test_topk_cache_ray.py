"""An offline teacher's cache read through Ray Data (raydistill.data.topk_cache.read_dataset) while every CPU
of the node is held, as the training workers hold them: the read and decode tasks take none, so the shards
still stream, in the cache's order, decoded exactly as read_shard decodes them."""

from __future__ import annotations

import time

import numpy as np
import pytest

from raydistill.data.topk_cache import open_cache, read_dataset, read_shard
from test_topk_cache import _write  # the shards of the format tests

pytestmark = pytest.mark.ray

N_CPUS = 2


@pytest.fixture(scope="module")
def ray2():
    from raydistill.distill.session import ray_session

    with ray_session(num_cpus=N_CPUS) as ray:
        yield ray


@pytest.mark.timeout(180)
@pytest.mark.parametrize("codec", ["cm", "q8", "raw"])
def test_shards_stream_in_order_while_all_cpus_are_held(ray2, tmp_path, codec):
    import ray.data


    rng = np.random.default_rng()
    bounds = [0, 7, 12, 20]  # uneven shards
    for a, b in zip(bounds, bounds[1:]):
        _write(tmp_path, a, b, rng, codec)
    info = open_cache(tmp_path)
    want = [read_shard(f) for f in info.files]
    want = {c: np.concatenate([w[c] for w in want]) for c in want[0]}

    @ray2.remote(num_cpus=N_CPUS)
    class Workers:  # what a trainer's workers reserve on a small node: every CPU
        def ready(self):
            return True

    hog = Workers.remote()
    try:
        assert ray2.get(hog.ready.remote(), timeout=120)
        assert ray2.available_resources().get("CPU", 0) == 0
        ctx = ray.data.DataContext.get_current()
        old, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
        try:
            ds = read_dataset(info)
        finally:
            ctx.execution_options.preserve_order = old
        got = {}
        for batch in ds.iter_batches(batch_size=5, batch_format="numpy"):
            for c, v in batch.items():
                got.setdefault(c, []).append(v)
        got = {c: np.concatenate(v) for c, v in got.items()}
    finally:
        ray2.kill(hog)
    assert set(got) == set(want) and len(got["input_ids"]) == 20
    for c in want:
        np.testing.assert_array_equal(got[c], want[c], err_msg=c)


def _plasma_mib(address) -> float:
    import re

    from ray._private.internal_api import memory_summary

    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=address, stats_only=True))
    return float(m.group(1)) if m else 0.0


@pytest.mark.timeout(240)
def test_decoded_shards_queued_ahead_of_a_slow_reader_stay_bounded(ray2, tmp_path):
    """A cache many shards long, read by a consumer slower than the decode (a training step's time per
    batch) while every CPU is held: the object store holds no more than the read-ahead budget and a few
    shards (the ones being decoded and read) -- measured 60 MiB here; without the bound Ray Data decodes
    the whole cache ahead of the reader (measured 113 MiB of a 121 MiB cache at 16 shards) -- and every
    row arrives, in order."""
    import threading

    import ray.data

    from raydistill.data.topk_cache import CacheMeta, read_ahead_bytes, shard_name, shard_table, write_shard
    from raydistill.data.topk_codec import CodecSpec

    k, vocab, s, rows, n_shards = 128, 4096, 128, 40, 32
    rng = np.random.default_rng()
    spec = CodecSpec(name="raw").resolved(k, vocab)
    for j in range(n_shards):
        a, b = j * rows, (j + 1) * rows
        meta = CacheMeta(codec=spec.to_dict(), k=k, vocab_size=vocab, task="causal_lm", tokens_per_row=s, rows=rows,
                         start=a, stop=b, input_columns=["input_ids"], tail_temperature=None)
        idx = (rng.integers(0, vocab, (rows, s, 1)) + np.arange(k) * 17) % vocab  # k distinct ids a token
        vals = -rng.random((rows, s, k), dtype=np.float32) * 10
        ids = np.broadcast_to(np.arange(a, b, dtype=np.int32)[:, None], (rows, s))  # row number: the order
        write_shard(tmp_path / shard_name(a, b), shard_table(meta, {"input_ids": ids}, vals, idx, None),
                    compression_level=1)
    info = open_cache(tmp_path)
    shard_mib = rows * s * (k * 12 + 8) / 2**20

    @ray2.remote(num_cpus=N_CPUS)
    class Workers:
        def ready(self):
            return True

    hog = Workers.remote()
    address = ray2.get_runtime_context().gcs_address
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _plasma_mib(address))
            stop.wait(0.05)

    try:
        assert ray2.get(hog.ready.remote(), timeout=120)
        ctx = ray.data.DataContext.get_current()
        old, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
        try:
            ds = read_dataset(info, tail=False)
        finally:
            ctx.execution_options.preserve_order = old
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        got = []
        for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
            got.append(batch["input_ids"][:, 0].copy())  # not a view: it would pin the block in the store
            time.sleep(0.05)  # 5 batches a shard: the decode runs far ahead of this reader
    finally:
        stop.set()
        ray2.kill(hog)
    np.testing.assert_array_equal(np.concatenate(got), np.arange(rows * n_shards))
    print(f"peak plasma {peak[0]:.0f} MiB, shards of {shard_mib:.1f} MiB, cache {shard_mib * n_shards:.0f} MiB")
    budget_mib = read_ahead_bytes(info) / 2**20
    assert peak[0] <= budget_mib + 6 * shard_mib < shard_mib * n_shards / 2, (peak[0], budget_mib, shard_mib)
