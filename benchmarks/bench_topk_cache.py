"""Offline teacher outputs at k = 128 on ``lm_default``'s corpus and teacher (issue 23): the compressed (cm, the
default, and q8) caches against the uncompressed (raw) one.

    PYTHONPATH=. python benchmarks/bench_topk_cache.py --storage runs [--parts size,epoch,students,resume]
        [--seeds 0,1,2] [--cm-v1 DIR] [--read-threads 2] [--reuse] [--out benchmarks/results/topk_cache.json]

``--storage`` holds ``lm_default``'s tokenized corpus and cached teacher (``raydistill distill lm_default``
or ``raydistill teacher-logits lm_default`` put them there; the teacher is trained first if missing). Parts:

* ``size``: writes the raw, the q8 and the cm cache with ``raydistill teacher-logits`` (Ray Data, 1 actor; kept in
  ``<storage>/bench_topk/<codec>-<shard rows>`` and reused), then bytes / token of each, the legacy format's bytes if
  ``--legacy DIR`` is given, and the q8 codec's frontier (value levels x bytes x KL(exact || decoded) over
  **all** tokens, the raw cache's float32 log-probabilities as the exact ones).
* ``epoch``: one training epoch of the distilled student (lm_default's settings) from each cache, side by
  side in this process (raw, q8, q8 + tail, cm, then again): the data-loader part (read + decode every shard
  into tensors)
  and the optimizer steps, timed separately.
* ``decode``: read + decode of every shard into tensors (the first half of ``epoch``, no training), each cache in
  turn, ``--repeats`` rounds, side by side in this process: wall and CPU seconds and tokens / s (median), with
  the load average of each run (on a loaded machine the CPU seconds are the steadier figure); one shard at a
  time, then (``--read-threads N`` > 1, default 2) again with N shards at once in threads (``<cache>_tN``).
* ``students``: the student distilled from raw, from q8 and from q8 with the tail, ``--seeds`` each, with the
  pipeline's loss, optimizer, schedule and batch order (``benchmarks/lm_kd_quick.py``): test perplexity
  and the ratio q8 / raw per seed.
* ``resume``: a pass with the default codec interrupted after one shard (``debug_fail_after_shards``), run
  again, against an uninterrupted pass: sha256 of every shard.

``--cm-v1 DIR``: a cm cache of the same outputs written in the codec's model version 1 (before version 2 was
the default), added to the ``size``, ``epoch`` and ``decode`` parts as ``cm_v1``.

Prints a table per part and writes everything, with the machine and load average, to ``--out``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_kd_quick import train_stage  # noqa: E402

from raydistill.config import load_config  # noqa: E402
from raydistill.data.topk_cache import (  # noqa: E402
    REPORT_FILE,
    CacheMeta,
    read_shards,
    shard_files,
    shard_table,
    write_shard,
)
from raydistill.data.topk_codec import CodecSpec, decode, encode, fidelity  # noqa: E402
from raydistill.utils import machine_info, write_json_atomic  # noqa: E402

K = 128


def _load(cache: Path, tail: bool, threads: int = 1) -> tuple[dict, float]:
    """Every shard read and decoded into tensors (what a worker's data loader does; ``threads`` shards at once,
    ``read_shards``), and the seconds it took."""
    t0 = time.perf_counter()
    cols = {c: torch.as_tensor(v) for c, v in read_shards(shard_files(cache), tail=tail, threads=threads).items()}
    cols = {c: v.float() if c in ("topk_values", "topk_tail") else v.long() for c, v in cols.items()}
    return cols, time.perf_counter() - t0


def write_caches(cfg, storage: Path, shard_rows: int | None, reuse: bool = False) -> dict[str, Path]:
    """The three caches (``reuse``: those already under ``<storage>/bench_topk``, no teacher pass)."""
    from raydistill.distill.teacher_logits import write_teacher_outputs

    out = {}
    for codec in ("raw", "q8", "cm"):
        d = storage / "bench_topk" / f"{codec}-{shard_rows or 'default'}"
        if reuse:
            if not d.is_dir() or not shard_files(d):
                raise SystemExit(f"--reuse: no {codec} cache in {d}")
            out[codec] = d
            continue
        t0 = time.time()
        write_teacher_outputs(cfg, storage_path=storage, output=d, topk=K, concurrency=1, codec=codec,
                              shard_rows=shard_rows)
        print(f"{codec} cache: {d} ({time.time() - t0:.0f} s)", flush=True)
        out[codec] = d
    return out


def part_size(caches: dict, legacy: str | None) -> dict:
    res = {}
    for name, d in caches.items():
        rep = json.loads((d / REPORT_FILE).read_text())
        res[name] = {k: rep[k] for k in ("bytes", "tokens", "bytes_per_token", "tokens_per_s", "fidelity", "codec",
                                         "compression")}
    if legacy:
        files = [f for f in Path(legacy).rglob("*.parquet")]
        nbytes = sum(f.stat().st_size for f in files)
        res["legacy"] = {"bytes": nbytes, "tokens": res["raw"]["tokens"], "bytes_per_token": nbytes / res["raw"]["tokens"]}
    # the q8 frontier on all tokens, the raw cache as the exact outputs
    exact, _ = _load(caches["raw"], tail=True)
    v = exact["topk_values"].numpy().reshape(-1, K)
    i = exact["topk_indices"].numpy().reshape(-1, K)
    t = exact["topk_tail"].numpy().reshape(-1)
    V = json.loads((caches["raw"] / REPORT_FILE).read_text())["vocab_size"]
    ids = exact["input_ids"].numpy().astype(np.int32)
    B, S = ids.shape
    rows = []
    for levels, coding in ((64, "bitmap"), (128, "bitmap"), (170, "bitmap"), (256, "bitmap"), (170, "gaps")):
        spec = CodecSpec(value_levels=levels, index_coding=coding).resolved(K, V)
        dv, di, dt = decode({f: b for f, (b, _) in encode(v, i, t, V, spec).items()}, len(v), K, V, spec)
        fid = fidelity(v, i, t, dv, di, dt)
        meta = CacheMeta(codec=spec.to_dict(), k=K, vocab_size=V, task="causal_lm", tokens_per_row=S, rows=B, start=0,
                         stop=B, input_columns=["input_ids"], tail_temperature=1.0)
        with tempfile.TemporaryDirectory() as tmp:
            nbytes = write_shard(Path(tmp) / "x.parquet", shard_table(meta, {"input_ids": ids}, v.reshape(B, S, K),
                                                                      i.reshape(B, S, K), t.reshape(B, S)))
        rows.append({"value_levels": levels, "index_coding": coding, "bytes_per_token": nbytes / len(v),
                     "kl_topk": fid["kl_topk"], "kl_with_tail": fid["kl_with_tail"],
                     "kl_rule": K / (6 * (levels - 1) ** 2)})
    res["frontier"] = rows
    print("\n| cache | bytes/token | KL top-k | KL with tail |\n|---|---:|---:|---:|")
    for name in ("legacy", "raw", "q8", "cm", "cm_v1"):
        if name in res:
            f = res[name].get("fidelity", {})
            kl = [f"{f[key]:.2e}" if f.get(key) is not None else "-" for key in ("kl_topk", "kl_with_tail")]
            print(f"| {name} | {res[name]['bytes_per_token']:.1f} | {kl[0]} | {kl[1]} |")
    print("\n| q8 value levels | ids | bytes/token (zstd 9) | KL top-k (all tokens) | KL with tail | k/(6(L-1)^2) |"
          "\n|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['value_levels']} | {r['index_coding']} | {r['bytes_per_token']:.1f} | {r['kl_topk']:.2e} | "
              f"{r['kl_with_tail']:.2e} | {r['kl_rule']:.2e} |")
    return res


def _setup(cfg, storage: Path):
    from raydistill.tasks import get_task
    from raydistill.tasks.causal_lm import text_data

    td = text_data(cfg, storage)
    info = {**td.info(), "seq_len": cfg.data.seq_len}
    ev = {"input_ids": torch.as_tensor(np.concatenate([td.val, td.test]), dtype=torch.int64),
          "split": torch.as_tensor([0] * len(td.val) + [1] * len(td.test))}
    return get_task("causal_lm"), td, info, ev


def _student(cfg, task, info, ev, data: dict, seed: int, epochs: int | None = None):
    """A student distilled from the decoded cache columns (the tail too when ``data`` has it) through the
    stage's Criterion (kd_logits in its top-k form + ce)."""
    d = cfg.distill
    train = data["input_ids"]
    off = {c: v for c, v in data.items() if c != "input_ids"}
    sm = {"model": cfg.student.model, "kwargs": dict(cfg.student.kwargs)}
    return train_stage(task, info, train, ev, sm, "kd", epochs or d.epochs, d.batch_size, d.optimizer.model_dump(),
                       d.lr_schedule.model_dump(), d.grad_clip, cfg, seed=seed, offline=off)[1]


def _ray_data_seconds(cache: Path, tail: bool) -> float:
    """Streaming the whole cache through Ray Data (read + decode in map_batches) into numpy batches, as a
    worker's data loader does: seconds."""
    from raydistill.data.topk_cache import read_teacher_outputs
    from raydistill.distill.session import ray_session

    with ray_session(num_cpus=2):
        ds = read_teacher_outputs(str(cache), tail=tail)
        t0 = time.perf_counter()
        n = sum(len(b["input_ids"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy"))
        dt = time.perf_counter() - t0
    assert n > 0
    return dt


def _runs(caches: dict) -> dict:
    runs = {"raw": (caches["raw"], False), "q8": (caches["q8"], False), "q8_tail": (caches["q8"], True),
            "cm": (caches["cm"], False)}
    if "cm_v1" in caches:
        runs["cm_v1"] = (caches["cm_v1"], False)
    return runs


def part_decode(caches, repeats: int, threads: int = 1) -> dict:
    """``threads`` > 1: every cache also read with that many shards at once (``<name>_t<threads>``)."""
    runs = {name: (cache, tail, 1) for name, (cache, tail) in _runs(caches).items()}
    if threads > 1:
        runs.update({f"{name}_t{threads}": (cache, tail, threads) for name, (cache, tail, _) in runs.items()})
    res = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (cache, tail, th) in runs.items():
            cpu = time.process_time()
            data, s = _load(cache, tail=tail, threads=th)
            cpu = time.process_time() - cpu
            n = data["topk_indices"].shape[0] * data["topk_indices"].shape[1]
            res[name].append({"load_decode_s": s, "cpu_s": cpu, "tokens": int(n), "tokens_per_s": n / s,
                              "loadavg": os.getloadavg()[0]})
            print(f"{name}: read + decode {s:.2f} s, {cpu:.2f} s of CPU ({n / s:,.0f} tokens/s, load "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    rows = []
    for name in runs:
        rs = res[name]
        med, cpu = (float(np.median([r[key] for r in rs])) for key in ("load_decode_s", "cpu_s"))
        res[f"{name}_median_s"], res[f"{name}_median_cpu_s"] = med, cpu
        loads = [r["loadavg"] for r in rs]
        rows.append([name, f"{med:.2f}", f"{rs[0]['tokens'] / med:,.0f}", f"{cpu:.2f}", f"{rs[0]['tokens'] / cpu:,.0f}",
                     f"{min(loads):.1f}-{max(loads):.1f}"])
    _table(["cache", "read + decode (s, median)", "tokens / s", "CPU s (median)", "tokens / CPU s", "load average"],
           rows)
    return res


def _table(columns: list[str], rows: list[list[str]]) -> None:
    """A markdown table (the first column left-aligned)."""
    print("\n| " + " | ".join(columns) + " |\n|---|" + "---:|" * (len(columns) - 1))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def part_epoch(cfg, storage, caches, repeats: int = 3) -> dict:
    task, td, info, ev = _setup(cfg, storage)
    runs = _runs(caches)
    res = {name: [] for name in runs}
    for name, (cache, tail) in runs.items():
        res[f"{name}_ray_data_s"] = _ray_data_seconds(cache, tail)
        print(f"{name}: Ray Data read + decode of the whole cache {res[f'{name}_ray_data_s']:.1f} s", flush=True)
    for _ in range(repeats):
        for name, (cache, tail) in runs.items():
            data, load_s = _load(cache, tail=tail)
            assert torch.equal(data["input_ids"], torch.as_tensor(td.train, dtype=torch.int64))
            t0 = time.perf_counter()
            r = _student(cfg, task, info, ev, data, seed=0, epochs=1)
            res[name].append({"load_decode_s": load_s, "epoch_s": r["seconds"], "total_s": load_s + r["seconds"],
                              "wall_s": time.perf_counter() - t0 + load_s, "loadavg": os.getloadavg()[0]})
            print(f"epoch from {name}: load+decode {load_s:.2f} s, 1 epoch {r['seconds']:.1f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    _table(["cache", "Ray Data read + decode (s)", "load + decode in process (s)", "epoch steps (s)", "total (s)"],
           [[name, f"{res[f'{name}_ray_data_s']:.1f}"]
            + [f"{np.median([r[key] for r in res[name]]):.{d}f}" for key, d in (("load_decode_s", 2), ("epoch_s", 1),
                                                                                  ("total_s", 1))]
            for name in runs])
    return res


def part_students(cfg, storage, caches, seeds) -> dict:
    task, td, info, ev = _setup(cfg, storage)
    runs = {"raw": (caches["raw"], False), "q8": (caches["q8"], False), "q8_tail": (caches["q8"], True)}
    res = {name: {} for name in runs}
    for seed in seeds:
        for name, (cache, tail) in runs.items():
            data, _ = _load(cache, tail)
            r = _student(cfg, task, info, ev, data, seed)
            res[name][seed] = {k: r[k] for k in ("perplexity", "val_perplexity", "next_token_accuracy", "seconds")}
            print(f"seed {seed} {name}: test ppl {r['perplexity']:.3f} val {r['val_perplexity']:.3f} "
                  f"({r['seconds']:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    print("\n| seed | raw | q8 | q8 / raw | q8 + tail | tail effect |\n|---:|---:|---:|---:|---:|---:|")
    for seed in seeds:
        a, b, c = (res[n][seed]["perplexity"] for n in ("raw", "q8", "q8_tail"))
        print(f"| {seed} | {a:.3f} | {b:.3f} | {b / a - 1:+.2%} | {c:.3f} | {c / b - 1:+.2%} |")
    mean = {n: float(np.mean([res[n][s]["perplexity"] for s in seeds])) for n in runs}
    print(f"| mean | {mean['raw']:.3f} | {mean['q8']:.3f} | {mean['q8'] / mean['raw'] - 1:+.2%} | "
          f"{mean['q8_tail']:.3f} | {mean['q8_tail'] / mean['q8'] - 1:+.2%} |")
    res["mean_perplexity"] = mean
    return res


def part_resume(cfg, storage, shard_rows: int | None) -> dict:
    from raydistill.distill.teacher_logits import write_teacher_outputs

    root = storage / "bench_topk" / "resume"
    kw = dict(storage_path=storage, topk=K, concurrency=1, shard_rows=shard_rows)
    full = write_teacher_outputs(cfg, output=root / "full", **kw)
    try:
        write_teacher_outputs(cfg, output=root / "interrupted", debug_fail_after_shards=1, **kw)
    except Exception as exc:  # noqa: BLE001 - the interruption
        print(f"interrupted as asked: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    resumed = write_teacher_outputs(cfg, output=root / "interrupted", **kw)
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    a = {f.name: sha(f) for f in shard_files(full)}
    b = {f.name: sha(f) for f in shard_files(resumed)}
    rep = json.loads((resumed / REPORT_FILE).read_text())
    res = {"shards": len(a), "identical": a == b, "resumed_shards": rep["resumed_shards"],
           "written_shards": rep["written_shards"], "sha256": a}
    print(f"\nresume: {len(a)} shards, {rep['resumed_shards']} kept + {rep['written_shards']} written after the "
          f"interruption; identical to the uninterrupted pass: {a == b}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default="runs")
    ap.add_argument("--config", default="lm_default")
    ap.add_argument("--parts", default="size,epoch,students,resume")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--shard-rows", type=int, default=None,
                    help="blocks per shard of the two caches (default: teacher-logits' own, 1024 at seq_len 64)")
    ap.add_argument("--resume-shard-rows", type=int, default=256,
                    help="blocks per shard of the resume part (lm_default: 1528 blocks -> 6 shards)")
    ap.add_argument("--legacy", default=None, help="a cache written by the old teacher-logits, for its size")
    ap.add_argument("--cm-v1", default=None, help="a cm cache of the same outputs in model version 1, compared too")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the decode part")
    ap.add_argument("--reuse", action="store_true",
                    help="read the caches already under <storage>/bench_topk as they are (no teacher pass)")
    ap.add_argument("--read-threads", type=int, default=2,
                    help="shards read at once by the decode part's second set of runs (1: only one at a time)")
    ap.add_argument("--out", default="benchmarks/results/topk_cache.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    storage = Path(a.storage).expanduser().resolve()
    cfg = load_config(a.config, [f"run.storage_path={storage}"])
    parts = a.parts.split(",")
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.update({"command": " ".join(["python", "benchmarks/bench_topk_cache.py", *(sys.argv[1:] if argv is None
                                                                                      else argv)]),
                "config": a.config, "k": K, "machine": machine_info("cpu")})
    caches = None
    if {"size", "epoch", "decode", "students"} & set(parts):
        caches = write_caches(cfg, storage, a.shard_rows, a.reuse)
        if a.cm_v1:
            caches["cm_v1"] = Path(a.cm_v1).expanduser().resolve()
    if "size" in parts:
        res["size"] = part_size(caches, a.legacy)
        write_json_atomic(out, res)
    if "decode" in parts:
        res["decode"] = part_decode(caches, a.repeats, a.read_threads)
        write_json_atomic(out, res)
    if "epoch" in parts:
        res["epoch"] = part_epoch(cfg, storage, caches)
        write_json_atomic(out, res)
    if "students" in parts:
        res["students"] = part_students(cfg, storage, caches, [int(s) for s in a.seeds.split(",")])
        write_json_atomic(out, res)
    if "resume" in parts:
        res["resume"] = part_resume(cfg, storage, a.resume_shard_rows)
    res["loadavg_at_end"] = os.getloadavg()
    write_json_atomic(out, res)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
