"""Driver memory of the corpus preparation (issue 22's target: preparing a corpus 10x larger grows the
driver's peak memory by at most 1.5x; measured at 20 MB and 200 MB).

    PYTHONPATH=. python benchmarks/bench_corpus_scale.py [--sizes-mb 20,200] [--storage runs]
        [--vocab 32000] [--seq 512] [--sample-mb 32] [--num-cpus 2] [--keep] [--out FILE]

The corpus exists on every machine without a download: the ``.py`` sources of the Python standard library
and of the installed packages (``sysconfig`` ``stdlib`` and ``purelib``), in sorted order, one document per
source file, written as jsonl files of 16 MiB under ``<storage>/bench_corpus_scale/corpus-<MB>mb`` until the
size is reached (when the sources run out they are taken again from the first, each copy with a one-line
header, so the corpus stays deterministic on a given machine). Each size is then prepared by the pipeline's
own :func:`raydistill.data.text.prepare_corpus` (``data.name: text``, ``data.path`` that folder, a BPE of
``--vocab`` trained on a seeded sample of ``--sample-mb``, blocks of ``--seq``) in a fresh process that
starts its own local Ray instance with ``--num-cpus`` CPUs and a fresh cache directory.

Measured: the driver's peak RSS (``VmHWM``) over the whole preparation, its RSS just before it (Ray started,
modules imported) and the growth above that; every Ray worker process's peak RSS (read from ``/proc``
before Ray shuts down); wall time, blocks and tokens. Prints a table and writes
``benchmarks/results/corpus_scale.json`` with the machine, the load averages and the git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _procmem  # noqa: E402

FILE_BYTES = 16 << 20


def source_files() -> list[Path]:
    """The ``.py`` files of the standard library and the installed packages, sorted, each once."""
    roots = []
    for key in ("stdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p and Path(p).is_dir() and Path(p).resolve() not in roots:
            roots.append(Path(p).resolve())
    seen, out = set(), []
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            try:
                real = f.resolve()
                if real in seen or not f.is_file():
                    continue
            except OSError:
                continue
            seen.add(real)
            out.append(f)
    return out


def iter_documents(files: list[Path], target_bytes: int):
    """The sources of ``files`` as documents, in order, until ``target_bytes`` (UTF-8 bytes) are given; when
    the files run out they are taken again from the first, each copy with a one-line header."""
    given, copy = 0, 0
    while given < target_bytes:
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if "\x00" in text or not text.strip():
                continue
            if copy:
                text = f"# copy {copy} of {f.name}\n{text}"
            yield text
            given += len(text.encode())
            if given >= target_bytes:
                return
        copy += 1


def make_corpus(out_dir: Path, target_bytes: int, files: list[Path]) -> dict:
    """jsonl files of about ``FILE_BYTES`` with ``{"text": source}`` lines until ``target_bytes`` (streamed:
    one source in memory at a time). Reused when its manifest says it has that size already."""
    done = out_dir.parent / f"{out_dir.name}.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        if meta.get("target_bytes") == target_bytes:
            return meta
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    written = docs = part = part_bytes = 0
    fh = None
    for text in iter_documents(files, 1 << 62):  # until the jsonl bytes reach target_bytes
        if written >= target_bytes:
            break
        line = (json.dumps({"text": text}) + "\n").encode()
        if fh is None or part_bytes >= FILE_BYTES:
            if fh is not None:
                fh.close()
            fh = open(out_dir / f"part-{part:04d}.jsonl", "wb")
            part, part_bytes = part + 1, 0
        fh.write(line)
        part_bytes += len(line)
        written += len(line)
        docs += 1
    if fh is not None:
        fh.close()
    meta = {"target_bytes": target_bytes, "bytes": written, "documents": docs, "files": part}
    done.write_text(json.dumps(meta))
    return meta


def _worker_peaks(pid: int) -> list[dict]:
    """Peak RSS (``VmHWM``) of the Ray worker processes under ``pid`` (the raylet's children)."""
    import psutil

    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            status = Path(f"/proc/{p.pid}/status").read_text()
        except (psutil.Error, OSError):
            continue
        if "default_worker" not in cmd and not cmd.startswith("ray::"):
            continue
        hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)
        out.append({"pid": p.pid, "peak_rss_mib": hwm / 2**20})
    return out


def prepare_once(corpus: str, cache: str, vocab: int, seq: int, sample_bytes: int, num_cpus: int) -> dict:
    """In a fresh process: start Ray, prepare the corpus, measure the driver and the workers."""
    from raydistill.config import load_config
    from raydistill.data.text import prepare_corpus
    from raydistill.distill.session import ray_session

    cfg = load_config("lm_default", [f"data.path={corpus}", "data.max_bytes=null", f"data.vocab_size={vocab}",
                                     f"data.seq_len={seq}", f"data.tokenizer_sample_bytes={sample_bytes}",
                                     f"teacher.kwargs.config.max_position_embeddings={seq}",
                                     f"student.kwargs.config.max_position_embeddings={seq}"])
    rss_start = _procmem.rss()
    with ray_session(num_cpus=num_cpus):
        rss_before = _procmem.rss()
        _procmem.reset_peak()
        t0 = time.perf_counter()
        td = prepare_corpus(cfg.data, Path(cache))
        wall = time.perf_counter() - t0
        peak = _procmem.peak()
        rss_after = _procmem.rss()
        workers = _worker_peaks(os.getpid())
    return {"wall_s": wall, "driver_peak_rss_mib": peak / 2**20, "driver_rss_before_mib": rss_before / 2**20,
            "driver_rss_at_start_mib": rss_start / 2**20, "driver_rss_after_mib": rss_after / 2**20,
            "driver_growth_mib": (peak - rss_before) / 2**20,
            "worker_peak_rss_mib_max": max((w["peak_rss_mib"] for w in workers), default=0.0),
            "worker_peak_rss_mib_sum": sum(w["peak_rss_mib"] for w in workers), "workers": workers,
            "train_blocks": td.train_blocks, "val_blocks": td.val_blocks, "test_blocks": td.test_blocks,
            "train_shards": len(td.train_files), "train_tokens": td.num_tokens, "vocab_size": td.vocab_size,
            "materialize_by_size": td.materialize}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="20,200")
    ap.add_argument("--storage", default="runs")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--sample-mb", type=float, default=32)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the prepared corpora (the rehearsal can reuse them)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from raydistill.utils import machine_info, results_dir, write_json_atomic

    info = machine_info()
    base = Path(args.storage).resolve() / "bench_corpus_scale"
    files = source_files()
    rows = []
    for mb in (int(s) for s in args.sizes_mb.split(",")):
        meta = make_corpus(base / f"corpus-{mb}mb", mb * 10**6, files)
        cache = base / f"prepared-{mb}mb"
        shutil.rmtree(cache, ignore_errors=True)  # a fresh preparation, not a cache hit
        load0 = os.getloadavg()
        r = _procmem.in_fresh_process(prepare_once, str(base / f"corpus-{mb}mb"), str(cache), args.vocab, args.seq,
                                      int(args.sample_mb * 2**20), args.num_cpus)
        r.update(size_mb=mb, corpus=meta, load_average_before=load0, load_average_after=os.getloadavg())
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
        rows.append(r)
        print(f"{mb:5d} MB  {r['wall_s']:7.1f} s  driver peak {r['driver_peak_rss_mib']:7.1f} MiB "
              f"(before {r['driver_rss_before_mib']:.1f}, +{r['driver_growth_mib']:.1f})  "
              f"workers: max peak {r['worker_peak_rss_mib_max']:.0f} MiB, {len(r['workers'])} processes  "
              f"{r['train_blocks']} train blocks, {r['train_tokens'] / 1e6:.1f} M tokens  "
              f"load {load0[0]:.1f} -> {r['load_average_after'][0]:.1f}", flush=True)
    ratios = {}
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        ratios = {"sizes_mb": [small["size_mb"], large["size_mb"]],
                  "driver_peak_ratio": large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"],
                  "driver_growth_ratio": (large["driver_growth_mib"] / small["driver_growth_mib"]
                                          if small["driver_growth_mib"] > 0 else None),
                  "worker_peak_ratio": large["worker_peak_rss_mib_max"] / max(small["worker_peak_rss_mib_max"], 1e-9)}
        ratios["target_driver_peak_ratio_max"] = 1.5
        ratios["target_met"] = ratios["driver_peak_ratio"] <= 1.5
        print(f"driver peak {large['size_mb']} MB / {small['size_mb']} MB: {ratios['driver_peak_ratio']:.3f} "
              f"(target <= 1.5: {'met' if ratios['target_met'] else 'NOT met'}); worker max peak ratio "
              f"{ratios['worker_peak_ratio']:.2f}")
    out = Path(args.out) if args.out else results_dir() / "corpus_scale.json"
    write_json_atomic(out, {"args": vars(args), "rows": rows, "ratios": ratios, "machine": info,
                            "load_average_end": os.getloadavg(), "time": time.time()})
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
