"""The object store an offline teacher's cache takes while a distillation reads it: materialised first (the
path before: ``read_dataset(...).materialize()`` held the whole decoded cache in the object store for the
whole stage) against streamed (``read_dataset`` iterated lazily, as the workers now read it, with its bound
on the decoded rows queued ahead of the reader) and streamed with Ray Data's defaults (``unbounded``: whole
decoded shards as blocks, Ray Data's own object-store budget; how ``read_dataset`` streamed before the
bound). Synthetic causal-LM caches (q8, k = 128, 128-token rows, ``--shard-rows`` rows a shard, random top-k
outputs); the Raylet's plasma usage is sampled every 50 ms while the rows are read once in 64-row batches,
each then held for ``--consumer-ms`` (a training step's time: the reader runs ahead of a slower consumer as
far as Ray Data lets it). Each streamed mode is also read once with no consumer time (``fast_seconds``: how
fast the shards arrive, which the bound must not slow down).

    python benchmarks/bench_offline_stream.py [--rows 512 2048] [--shard-rows 256] [--consumer-ms 200] [--out PATH]

Writes ``benchmarks/results/offline_stream.json`` (machine, load averages, git commit): per size and mode the
decoded bytes, the peak plasma usage and the seconds to read the rows; the target is a streamed peak that
does not grow with the cache (large / small <= 1.5) where the materialised one grows with it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procmem  # noqa: E402

K, V, S, SHARD_ROWS = 128, 2048, 128, 256


def _write_cache(d: Path, rows: int, shard_rows: int = SHARD_ROWS, seed: int = 0) -> None:
    import torch

    from raydistill.data.topk_cache import CacheMeta, shard_name, shard_plan, shard_table, write_shard
    from raydistill.data.topk_codec import CodecSpec, topk_from_logits

    rng = np.random.default_rng(seed)
    spec = CodecSpec(name="q8", gamma=0.25).resolved(K, V)
    for a, b in shard_plan(rows, shard_rows):
        logits = torch.from_numpy(rng.standard_normal((b - a, S, V), dtype=np.float32) * 3)
        v, i, t = (x.numpy() for x in topk_from_logits(logits, K, 2.0))
        meta = CacheMeta(codec=spec.to_dict(), k=K, vocab_size=V, task="causal_lm", tokens_per_row=S, rows=b - a,
                         start=a, stop=b, input_columns=["input_ids"], tail_temperature=2.0)
        ids = rng.integers(0, V, (b - a, S)).astype(np.int32)
        write_shard(d / shard_name(a, b), shard_table(meta, {"input_ids": ids}, v, i, t))


class PlasmaSampler(_procmem.Poller):
    """The peak of the Raylet's plasma (object store) usage, sampled in a thread."""

    def __init__(self, address: str, every: float = 0.05):
        super().__init__(every)
        self.address, self.peak_mib = address, 0.0

    def usage_mib(self) -> float:
        from ray._private.internal_api import memory_summary

        m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=self.address, stats_only=True))
        return float(m.group(1)) if m else 0.0

    def _sample(self) -> None:
        self.peak_mib = max(self.peak_mib, self.usage_mib())


def _settle(address: str, timeout_s: float = 60.0) -> float:
    """Wait until the object store is (nearly) empty again (freed objects leave asynchronously); its usage."""
    s = PlasmaSampler(address)
    t0 = time.perf_counter()
    while (used := s.usage_mib()) > 1 and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.2)
    return used


def _dataset(info, mode: str):
    """The cache as ``mode`` reads it: ``streamed`` (read_dataset), ``unbounded`` (read_dataset without its
    bound: Ray Data's default block size and object-store budget), ``materialized``."""
    import copy

    import ray.data

    from raydistill.data.topk_cache import read_dataset

    ds = read_dataset(info)
    if mode == "unbounded":
        defaults = ray.data.DataContext.get_current()
        ds.context.target_max_block_size = defaults.target_max_block_size
        ds.context.execution_options.resource_limits = copy.deepcopy(defaults.execution_options.resource_limits)
    return ds.materialize() if mode == "materialized" else ds


def _read(info, mode: str, address: str, consumer_s: float) -> dict:
    before = _settle(address)
    t0 = time.perf_counter()
    with PlasmaSampler(address) as s:
        ds = _dataset(info, mode)
        n = 0
        for b in ds.iter_batches(batch_size=64, batch_format="numpy"):
            n += len(b["input_ids"])
            time.sleep(consumer_s)
        held = ds.size_bytes() if mode == "materialized" else None
        del ds
    out = {"rows_read": n, "plasma_before_mib": before, "peak_plasma_mib": s.peak_mib,
           "seconds": time.perf_counter() - t0, "materialized_bytes": held, "loadavg": os.getloadavg()[0]}
    if mode != "materialized":  # how fast the rows arrive with no consumer time (the read's own speed)
        _settle(address)
        t0 = time.perf_counter()
        n = sum(len(b["input_ids"]) for b in _dataset(info, mode).iter_batches(batch_size=64, batch_format="numpy"))
        out["fast_seconds"] = time.perf_counter() - t0
        assert n == out["rows_read"]
    return out


MODES = ("streamed", "unbounded", "materialized")


def main(argv=None) -> int:
    from raydistill.data.topk_cache import open_cache
    from raydistill.distill.offline import decoded_bytes
    from raydistill.distill.session import ray_session
    from raydistill.utils import machine_info, results_dir, write_json_atomic

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--shard-rows", type=int, default=SHARD_ROWS, help="rows a shard of the synthetic caches")
    p.add_argument("--consumer-ms", type=float, default=200.0,
                   help="time spent on each 64-row batch (a training step; slower than the decode, as training is)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    info_m = machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=2) as ray:
        address = ray.get_runtime_context().gcs_address
        for n in args.rows:
            d = Path(tmp) / f"cache{n}"
            d.mkdir()
            _write_cache(d, n, args.shard_rows)
            info = open_cache(d)
            if not rows:  # warm up: the first read starts Ray's workers
                sum(len(b["input_ids"]) for b in _dataset(info, "streamed").iter_batches(batch_size=64))
            row = {"rows": n, "tokens": n * S, "shards": len(info.files), "decoded_mib": decoded_bytes(info) / 2**20,
                   "disk_mib": sum(f.stat().st_size for f in info.files) / 2**20}
            for mode in MODES:
                row[mode] = _read(info, mode, address, args.consumer_ms / 1000)
                fast = row[mode].get("fast_seconds")
                print(f"{n} rows ({row['decoded_mib']:.0f} MiB decoded, {len(info.files)} shards), {mode}: peak "
                      f"plasma {row[mode]['peak_plasma_mib']:.0f} MiB, {row[mode]['seconds']:.1f} s"
                      + (f", {fast:.1f} s with no consumer time" if fast is not None else "")
                      + f" (load {row[mode]['loadavg']:.1f})", flush=True)
            rows.append(row)
    print("\n| rows | shards | decoded (MiB) | peak plasma (MiB): materialized | unbounded | streamed | "
          "read, no consumer time (s): unbounded | streamed |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rows']} | {r['shards']} | {r['decoded_mib']:.0f} | {r['materialized']['peak_plasma_mib']:.0f} | "
              f"{r['unbounded']['peak_plasma_mib']:.0f} | {r['streamed']['peak_plasma_mib']:.0f} | "
              f"{r['unbounded']['fast_seconds']:.2f} | {r['streamed']['fast_seconds']:.2f} |")
    ratios = {}
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        ratios = {mode: large[mode]["peak_plasma_mib"] / max(small[mode]["peak_plasma_mib"], 1.0)
                  for mode in MODES}
        ratios["decoded"] = large["decoded_mib"] / small["decoded_mib"]
        ratios["target_streamed_max"] = 1.5
        ratios["target_met"] = ratios["streamed"] <= 1.5
        print(f"\npeak plasma, {large['rows']} / {small['rows']} rows (decoded x{ratios['decoded']:.1f}): "
              f"materialized x{ratios['materialized']:.2f}, unbounded x{ratios['unbounded']:.2f}, "
              f"streamed x{ratios['streamed']:.2f} "
              f"(target <= 1.5: {'met' if ratios['target_met'] else 'NOT met'})")
    out = Path(args.out) if args.out else results_dir() / "offline_stream.json"
    write_json_atomic(out, {"args": vars(args), "rows": rows, "ratios": ratios, "machine": info_m,
                            "load_average_end": os.getloadavg(), "time": time.time()})
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
