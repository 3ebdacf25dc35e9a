"""``raydistill bench spmm``: SparseLinear (raydistill::spmm/sddmm) vs dense F.linear vs torch.sparse.mm (CSR).

For each shape (out x in), batch and sparsity (random unstructured masks) it measures, side by side in
one run, median wall times of the forward (and of forward+backward), in two timing modes
(``--timing``, default both):

* ``turn``: single calls in turn (dense, SparseLinear, torch.sparse, dense, ...), each timed. This is how
  a model calls the layer: right after a dense (MKL) op, whose OpenMP threads are still spinning.
* ``blocks``: interleaved blocks (one untimed call, then ``block`` timed calls of each method, round
  robin): each method mostly follows itself, so the switch cost is hidden.

``--pools`` adds a row timed with the previous threading design (helpers on torch's inter-op pool,
``RAYDISTILL_SPMM_POOL=interop``). Prints a table with the speedups and the crossover sparsity (the
lowest swept sparsity from which SparseLinear's forward beats dense), and writes JSON with machine details
to ``benchmarks/results/spmm_<device>[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from pathlib import Path

from raydistill.utils import machine_info, results_dir

SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.99)
BATCHES = (1, 16, 64, 256)
SHAPES = ((1024, 1024), (4096, 4096), (11008, 4096))  # (out_features, in_features)
QUICK = dict(sparsities=(0.7, 0.9), batches=(1, 64), shapes=((1024, 1024), (4096, 4096)))


def _machine(device: str, threads: int) -> dict:
    return dict(machine_info(device), threads=threads)


def _timer(device: str):
    import torch

    def run(fn, repeats: int, budget_s: float) -> float | None:
        """Median seconds of fn(); repeats capped so one config takes about budget_s."""
        try:
            fn()  # warm-up (and: does it work at all?)
        except (RuntimeError, NotImplementedError, TypeError):
            return None
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        t_end = time.perf_counter() + budget_s
        for i in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if i >= 2 and time.perf_counter() > t_end:
                break
        return statistics.median(times)

    def warm(fns: dict) -> dict:
        """One untimed call of each fn; the ones that work (a fn that raises is left out: None later)."""
        ok = {}
        for k, fn in fns.items():
            try:
                fn()
                ok[k] = fn
            except (RuntimeError, NotImplementedError, TypeError):
                pass
        if device == "cuda":
            torch.cuda.synchronize()
        return ok

    def interleaved(fns: dict, repeats: int, budget_s: float, block: int = 5) -> dict:
        """Median seconds of each fn, timed in interleaved blocks (A x block, B x block, ..., A x block, ...).

        Rounds go round-robin so load changes on a shared machine hit every fn alike; within a round each
        fn first makes one untimed call, then ``block`` timed ones. The untimed call absorbs the switch
        from the previous fn: MKL / oneDNN (dense, torch.sparse) leave OpenMP threads spinning after a
        call, which steal a core from whatever runs next (measured here: single-call round-robin made
        SparseLinear's forward 1.5-2x slower than when it runs alone, and its ratio vs torch.sparse
        varied 1.5x-2.4x between identical runs). A fn that fails its warm-up gets None."""
        ok = warm(fns)
        times = {k: [] for k in ok}
        t_end = time.perf_counter() + budget_s * max(1, len(ok))
        for i in range(max(1, -(-repeats // block))):
            for k, fn in ok.items():
                fn()  # untimed: the switch from the previous fn
                for _ in range(block):
                    t0 = time.perf_counter()
                    fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[k].append(time.perf_counter() - t0)
            if i >= 1 and time.perf_counter() > t_end:
                break
        return {k: (statistics.median(times[k]) if k in times else None) for k in fns}

    def turn(fns: dict, repeats: int, budget_s: float) -> dict:
        """Median seconds of each fn, one call of each in turn, every call timed: each fn runs right after
        another one, as layers do in a model. Each round calls them in a fresh order (a shuffle seeded with
        0, so runs repeat), so each fn follows each other one (the dense MKL call included) about equally
        often: with a fixed order the fn after the dense call alone paid for the caches and OpenMP threads
        it leaves behind. A fn failing its warm-up: None."""
        ok = warm(fns)
        times = {k: [] for k in ok}
        t_end = time.perf_counter() + budget_s * max(1, len(ok))
        items = list(ok.items())
        rng = random.Random(0)
        last = None
        for i in range(max(3, repeats * 3)):
            order = rng.sample(items, len(items))
            if len(order) > 1 and order[0][0] == last:  # never the same fn twice in a row
                order = order[1:] + order[:1]
            last = order[-1][0]
            for k, fn in order:
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
            if i >= 4 and time.perf_counter() > t_end:
                break
        return {k: (statistics.median(times[k]) if k in times else None) for k in fns}

    run.interleaved = interleaved
    run.turn = turn
    return run


def with_pool(fn, pool: str):
    """fn run with RAYDISTILL_SPMM_POOL=pool (read per call by the CPU kernels), restored afterwards."""
    def wrapped():
        old = os.environ.get("RAYDISTILL_SPMM_POOL")
        os.environ["RAYDISTILL_SPMM_POOL"] = pool
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["RAYDISTILL_SPMM_POOL"]
            else:
                os.environ["RAYDISTILL_SPMM_POOL"] = old
    return wrapped


def main(argv: list[str] | None = None) -> int:
    args = list(argv or [])
    if "--device=cuda" in args or any(x == "--device" and y == "cuda" for x, y in zip(args, args[1:])):
        from raydistill.bench.spmm_cuda import main as cuda_main  # GPU: call vs kernel time, chosen path

        return cuda_main(args)
    p = argparse.ArgumentParser(prog="raydistill bench spmm", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sweep (< 60 s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (cpu; default: all)")
    p.add_argument("--repeats", type=int, default=None, help="max timed repeats per config")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--shapes", default=None, help="focused sweep: comma list of OUTxIN, e.g. 4096x4096")
    p.add_argument("--batches", default=None, help="focused sweep: comma list of batch sizes, e.g. 16,64")
    p.add_argument("--sparsities", default=None, help="focused sweep: comma list, e.g. 0.7,0.9")
    p.add_argument("--timing", choices=("both", "turn", "blocks"), default="both",
                   help="turn: single calls in turn; blocks: interleaved blocks; both (default)")
    p.add_argument("--pools", action="store_true",
                   help="also time SparseLinear on the previous inter-op pool design (RAYDISTILL_SPMM_POOL=interop)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/spmm_<device>[_quick].json)")
    a = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from rich.console import Console
    from rich.table import Table

    from raydistill._build import load_extension, op_backend
    from raydistill.ops.sparse import SparseLinear

    con = Console(width=max(Console().width, 160))
    if a.device == "cuda" and not torch.cuda.is_available():
        con.print("[red]--device cuda: no CUDA device available[/red]")
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    st = load_extension()
    backend = op_backend("spmm", a.device)
    if backend != "compiled":
        con.print(f"[yellow]warning: raydistill::spmm is not compiled for {a.device} ({st.reason}); "
                  "timing the PyTorch reference path[/yellow]")
    sweep = dict(QUICK if a.quick else dict(sparsities=SPARSITIES, batches=BATCHES, shapes=SHAPES))
    if a.shapes:
        sweep["shapes"] = tuple(tuple(int(v) for v in sh.lower().split("x")) for sh in a.shapes.split(","))
    if a.batches:
        sweep["batches"] = tuple(int(v) for v in a.batches.split(","))
    if a.sparsities:
        sweep["sparsities"] = tuple(float(v) for v in a.sparsities.split(","))
    modes = ("turn", "blocks") if a.timing == "both" else (a.timing,)
    dev = torch.device(a.device)
    timer = _timer(a.device)
    t_start = time.perf_counter()
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for out_f, in_f in sweep["shapes"]:
        big = out_f * in_f > 20e6
        reps = a.repeats or (5 if a.quick else (7 if big else 15))
        budget = 0.4 if a.quick else (1.0 if big else 0.6)
        lin = torch.nn.Linear(in_f, out_f, device=dev, dtype=dtype)
        for s in sweep["sparsities"]:
            mask = (torch.rand(out_f, in_f, generator=g) >= s).to(dev)
            sl = SparseLinear.from_dense(lin, mask)
            w_dense = (lin.weight.detach() * mask).requires_grad_()
            b_dense = lin.bias.detach().clone().requires_grad_()
            w_csr = w_dense.detach().to_sparse_csr()
            for n in sweep["batches"]:
                x = torch.randn(n, in_f, device=dev, dtype=dtype, generator=None)
                xg = x.clone().requires_grad_()
                fwd = {"dense": lambda: F.linear(x, w_dense, b_dense), "ours": lambda: sl(x),
                       "tsp": lambda: torch.sparse.mm(w_csr, x.t()).t() + b_dense}
                if a.pools and a.device == "cpu":
                    fwd["ours_interop"] = with_pool(lambda: sl(x), "interop")
                row = {"shape": [out_f, in_f], "out_features": out_f, "in_features": in_f, "batch": n,
                       "sparsity": s, "nnz": sl.nnz, "dtype": str(dtype).removeprefix("torch.")}
                for mode in modes:
                    with torch.no_grad():
                        tm = (timer.turn if mode == "turn" else timer.interleaved)(fwd, reps, budget)
                    row[mode] = {"dense_fwd_ms": _ms(tm["dense"]), "sparse_linear_fwd_ms": _ms(tm["ours"]),
                                 "torch_sparse_fwd_ms": _ms(tm["tsp"])}
                    if "ours_interop" in tm:
                        row[mode]["sparse_linear_interop_fwd_ms"] = _ms(tm["ours_interop"])
                    m = row[mode]
                    m["speedup_vs_dense"] = _ratio(m["dense_fwd_ms"], m["sparse_linear_fwd_ms"])
                    m["speedup_vs_torch_sparse"] = _ratio(m["torch_sparse_fwd_ms"], m["sparse_linear_fwd_ms"])
                # the headline columns: the first mode run ("turn" unless --timing blocks)
                row.update({k: row[modes[0]][k] for k in ("dense_fwd_ms", "sparse_linear_fwd_ms",
                                                          "torch_sparse_fwd_ms")})
                if not a.no_backward:
                    def dense_fb():
                        F.linear(xg, w_dense, b_dense).sum().backward()

                    def ours_fb():
                        sl(xg).sum().backward()

                    tb = timer.interleaved({"dense": dense_fb, "ours": ours_fb}, reps, budget)
                    row["dense_fwd_bwd_ms"] = _ms(tb["dense"])
                    row["sparse_linear_fwd_bwd_ms"] = _ms(tb["ours"])
                    sl.zero_grad(set_to_none=True)
                    w_dense.grad = b_dense.grad = xg.grad = None
                row["speedup_vs_dense"] = row[modes[0]]["speedup_vs_dense"]
                row["speedup_vs_torch_sparse"] = row[modes[0]]["speedup_vs_torch_sparse"]
                if not a.no_backward:
                    row["fwd_bwd_speedup_vs_dense"] = _ratio(row["dense_fwd_bwd_ms"], row["sparse_linear_fwd_bwd_ms"])
                rows.append(row)
                for mode in modes:
                    m = row[mode]
                    con.print(f"  {out_f}x{in_f} s={s:<4} N={n:<4} [{mode:>6}] dense {m['dense_fwd_ms']} ms | "
                              f"SparseLinear {m['sparse_linear_fwd_ms']} ms | torch.sparse {m['torch_sparse_fwd_ms']} ms"
                              + (f" | SparseLinear (inter-op pool) {m['sparse_linear_interop_fwd_ms']} ms"
                                 if "sparse_linear_interop_fwd_ms" in m else ""), highlight=False)
            del sl, w_dense, w_csr, mask
    elapsed = time.perf_counter() - t_start

    # crossover: lowest swept sparsity from which SparseLinear's forward beats dense (for all higher ones)
    crossover = []
    for out_f, in_f in sweep["shapes"]:
        for n in sweep["batches"]:
            rs = sorted((r for r in rows if r["shape"] == [out_f, in_f] and r["batch"] == n),
                        key=lambda r: r["sparsity"])
            wins = [(r["speedup_vs_dense"] or 0) > 1.0 for r in rs]
            cross = None
            for i in range(len(rs)):
                if all(wins[i:]):
                    cross = rs[i]["sparsity"]
                    break
            crossover.append({"shape": [out_f, in_f], "batch": n, "beats_dense_from_sparsity": cross})

    t = Table(title=f"SparseLinear vs dense vs torch.sparse ({a.device}, {str(dtype).removeprefix('torch.')}, "
                    f"{threads} threads; median ms; turn = single calls in turn, blocks = interleaved blocks)")
    cols = ["shape", "batch", "sparsity", "timing", "dense", "SparseLinear", "torch.sparse", "x dense", "x t.sparse"]
    if a.pools:
        cols += ["SL inter-op pool"]
    cols += ["fwd+bwd dense", "fwd+bwd SL", "x dense (f+b)"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        for i, mode in enumerate(modes):
            m = r[mode]
            cells = [f"{r['out_features']}x{r['in_features']}", str(r["batch"]), f"{r['sparsity']:.2f}", mode,
                     _f(m["dense_fwd_ms"]), _f(m["sparse_linear_fwd_ms"]), _f(m["torch_sparse_fwd_ms"]),
                     _f(m["speedup_vs_dense"], "x"), _f(m["speedup_vs_torch_sparse"], "x")]
            if a.pools:
                cells.append(_f(m.get("sparse_linear_interop_fwd_ms")))
            first = i == 0
            cells += [_f(r.get("dense_fwd_bwd_ms")) if first else "", _f(r.get("sparse_linear_fwd_bwd_ms")) if first
                      else "", _f(r.get("fwd_bwd_speedup_vs_dense"), "x") if first else ""]
            t.add_row(*cells)
    con.print(t)
    ct = Table(title="crossover: SparseLinear forward beats dense from sparsity")
    ct.add_column("shape")
    ct.add_column("batch", justify="right")
    ct.add_column("from sparsity", justify="right")
    for c in crossover:
        ct.add_row(f"{c['shape'][0]}x{c['shape'][1]}", str(c["batch"]),
                   "never (in sweep)" if c["beats_dense_from_sparsity"] is None else f"{c['beats_dense_from_sparsity']:.2f}")
    con.print(ct)

    out = Path(a.out) if a.out else (results_dir() /
                                     f"spmm_{a.device}{'_quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "spmm", "argv": argv if argv is not None else [], "device": a.device,
           "dtype": str(dtype).removeprefix("torch."), "backend": backend, "machine": _machine(a.device, threads),
           "timing_modes": list(modes), "elapsed_s": round(elapsed, 1), "results": rows, "crossover": crossover}
    out.write_text(json.dumps(doc, indent=1))
    con.print(f"wrote {out} ({elapsed:.0f} s)")
    return 0


def _ms(t: float | None) -> float | None:
    return None if t is None else round(t * 1e3, 4)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 3)


def _f(v, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:.2f}{suffix}" if suffix else f"{v:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
