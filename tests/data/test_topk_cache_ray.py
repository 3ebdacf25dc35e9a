"""An offline teacher's cache read through Ray Data (raydistill.data.topk_cache.read_dataset) while every CPU
of the node is held, as the training workers hold them: the read and decode tasks take none, so the shards
still stream, in the cache's order, decoded exactly as read_shard decodes them."""

from __future__ import annotations

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
