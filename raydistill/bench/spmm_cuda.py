"""``raydistill bench spmm --device cuda``: SparseLinear on a GPU vs cuBLAS dense vs torch.sparse (CSR).

For each shape, sparsity (random unstructured mask) and batch, side by side in one run:

* ``dense``        -- ``F.linear`` on the masked dense weight (cuBLAS)
* ``SparseLinear`` -- the layer as users call it: the path chosen by the measured crossover
  (``raydistill.ops.sparse_dispatch``: the CSR kernel or the masked-dense cuBLAS path)
* ``csr kernel``   -- the layer forced onto the CSR kernel (``RAYDISTILL_SPMM_PATH=sparse``)
* ``torch.sparse`` -- ``torch.sparse.mm`` on a CSR tensor (cuSPARSE)

Two times per method: ``call`` = CUDA-event time of a loop of back-to-back calls divided by the calls
(what a model sees; includes host overhead when the call is host-bound), and ``kernel`` = the same calls
captured once in a CUDA graph and replayed (device time only). Host overhead = call - kernel. The CSR
kernel's fraction of the copy bandwidth is (values + indices + x + y bytes) / kernel time / the
device-to-device copy bandwidth measured in the same run. Forward+backward: ``call`` times only.
JSON: ``benchmarks/results/spmm_cuda.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from raydistill.utils import results_dir

SHAPES = ((4096, 4096), (11008, 4096))
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
BATCHES = (1, 16, 64, 256)


def _events_ms(fn, calls: int, reps: int) -> float:
    from raydistill.utils import cuda_median_ms

    return cuda_median_ms(fn, reps=reps, warmup=1, calls=calls)


def _graph_ms(fn, calls: int, reps: int) -> float | None:
    import torch

    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        return _events_ms(g.replay, 1, reps) / calls
    except Exception:  # noqa: BLE001 - an op that cannot be captured gets no kernel time
        torch.cuda.synchronize()
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydistill bench spmm --device cuda", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shapes", default=None, help="comma list of OUTxIN")
    p.add_argument("--batches", default=None)
    p.add_argument("--sparsities", default=None)
    p.add_argument("--calls", type=int, default=20, help="calls per timed loop / graph")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None, help="ignored (CPU option)")
    p.add_argument("--repeats", type=int, default=None, help="ignored (CPU option)")
    a = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from rich.console import Console
    from rich.table import Table

    from raydistill._build import load_extension, op_backend
    from raydistill.bench.kd_loss import machine_info, measure_copy_bandwidth
    from raydistill.ops import sparse_dispatch
    from raydistill.ops.sparse import SparseLinear

    con = Console(width=200)
    if not torch.cuda.is_available():
        con.print("[red]--device cuda: no CUDA device available[/red]")
        return 2
    dev = torch.device("cuda")
    dtype = getattr(torch, a.dtype)
    st = load_extension()
    backend = op_backend("spmm", "cuda")
    if backend != "compiled":
        con.print(f"[yellow]warning: raydistill::spmm has no compiled CUDA kernel ({st.reason})[/yellow]")
    shapes = SHAPES if not a.shapes else tuple(tuple(int(v) for v in s.split("x")) for s in a.shapes.split(","))
    batches = BATCHES if not a.batches else tuple(int(v) for v in a.batches.split(","))
    sparsities = SPARSITIES if not a.sparsities else tuple(float(v) for v in a.sparsities.split(","))
    if a.quick:
        shapes, batches, sparsities = shapes[:1], (1, 16, 256), (0.5, 0.9)
    bw = measure_copy_bandwidth(dev)
    machine = machine_info(dev)
    machine["copy_bandwidth_GBps"] = bw / 1e9
    con.print(f"device-to-device copy: {bw / 1e12:.2f} TB/s")
    esz = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)
    rows = []
    t0 = time.perf_counter()
    for out_f, in_f in shapes:
        lin = torch.nn.Linear(in_f, out_f, device=dev, dtype=dtype)
        for s in sparsities:
            mask = (torch.rand(out_f, in_f, generator=g) >= s).to(dev)
            sl = SparseLinear.from_dense(lin, mask)
            w = (lin.weight.detach() * mask).requires_grad_()
            b = lin.bias.detach().clone().requires_grad_()
            try:
                w_csr = w.detach().to_sparse_csr()
            except RuntimeError:
                w_csr = None
            for n in batches:
                x = torch.randn(n, in_f, device=dev, dtype=dtype)
                os.environ[sparse_dispatch.PATH_ENV] = "auto"
                path = sparse_dispatch.choose_path(sl, x)
                fns = {"dense": lambda: F.linear(x, w, b), "SparseLinear": lambda: sl(x)}

                def forced():
                    return sl._spmm(x)

                fns["csr kernel"] = forced
                if w_csr is not None:
                    fns["torch.sparse"] = lambda: torch.sparse.mm(w_csr, x.t()).t() + b
                row = {"out_features": out_f, "in_features": in_f, "batch": n, "sparsity": s, "nnz": sl.nnz,
                       "dtype": a.dtype, "chosen_path": path}
                with torch.no_grad():
                    for k, fn in fns.items():
                        try:
                            row[f"{k}_call_ms"] = _events_ms(fn, a.calls, a.reps)
                        except RuntimeError as e:
                            row[f"{k}_call_ms"] = None
                            row[f"{k}_error"] = str(e)[:200]
                        row[f"{k}_kernel_ms"] = _graph_ms(fn, a.calls, a.reps) if row[f"{k}_call_ms"] else None
                csr_bytes = sl.nnz * (esz + 4) + (out_f + 1) * 4 + n * (in_f + out_f) * esz
                kt = row.get("csr kernel_kernel_ms")
                row["csr_bytes"] = csr_bytes
                row["dense_weight_bytes"] = out_f * in_f * esz
                row["csr_frac_of_copy_bw"] = csr_bytes / (kt * 1e-3) / bw if kt else None
                if not a.no_backward:
                    xg = x.clone().requires_grad_()

                    def dense_fb():
                        F.linear(xg, w, b).sum().backward()

                    def ours_fb():
                        sl(xg).sum().backward()

                    row["dense_fwd_bwd_call_ms"] = _events_ms(dense_fb, a.calls, a.reps)
                    row["SparseLinear_fwd_bwd_call_ms"] = _events_ms(ours_fb, a.calls, a.reps)
                    os.environ[sparse_dispatch.PATH_ENV] = "sparse"
                    row["csr_fwd_bwd_call_ms"] = _events_ms(ours_fb, a.calls, a.reps)
                    os.environ[sparse_dispatch.PATH_ENV] = "auto"
                    sl.zero_grad(set_to_none=True)
                    w.grad = b.grad = xg.grad = None
                d, o = row["dense_call_ms"], row["SparseLinear_call_ms"]
                row["fwd_speedup_vs_dense"] = d / o if d and o else None
                dk, ck = row.get("dense_kernel_ms"), row.get("csr kernel_kernel_ms")
                row["csr_kernel_speedup_vs_dense_kernel"] = dk / ck if dk and ck else None
                if not a.no_backward:
                    row["fwd_bwd_speedup_vs_dense"] = row["dense_fwd_bwd_call_ms"] / row["SparseLinear_fwd_bwd_call_ms"]
                c, k2 = row.get("csr kernel_call_ms"), row.get("csr kernel_kernel_ms")
                row["csr_host_overhead_us"] = (c - k2) * 1e3 if c and k2 else None
                rows.append(row)
                con.print(f"  {out_f}x{in_f} s={s} N={n}: dense {d:.4f} | SL[{path}] {o:.4f} | csr "
                          f"{row['csr kernel_call_ms']:.4f} (kernel {ck or float('nan'):.4f}) | "
                          f"t.sparse {row.get('torch.sparse_call_ms') or float('nan'):.4f} ms", highlight=False)
            sl.release_dense_cache()
            del sl, w, w_csr, mask
    elapsed = time.perf_counter() - t0

    t = Table(title=f"SparseLinear on {machine.get('gpu')} ({a.dtype}; ms per call, median)")
    for c in ("shape", "batch", "sparsity", "dense", "SparseLinear", "path", "csr kernel", "csr kernel (graph)",
              "dense (graph)", "torch.sparse", "x dense", "kernel x dense", "% copy bw", "host us",
              "f+b dense", "f+b SL", "f+b x dense"):
        t.add_column(c, justify="right")

    def f(v, fmt="{:.4f}"):
        return "n/a" if v is None else fmt.format(v)

    for r in rows:
        t.add_row(f"{r['out_features']}x{r['in_features']}", str(r["batch"]), f"{r['sparsity']:.2f}",
                  f(r["dense_call_ms"]), f(r["SparseLinear_call_ms"]), r["chosen_path"], f(r["csr kernel_call_ms"]),
                  f(r.get("csr kernel_kernel_ms")), f(r.get("dense_kernel_ms")), f(r.get("torch.sparse_call_ms")),
                  f(r["fwd_speedup_vs_dense"], "{:.2f}x"), f(r["csr_kernel_speedup_vs_dense_kernel"], "{:.2f}x"),
                  f(None if r["csr_frac_of_copy_bw"] is None else 100 * r["csr_frac_of_copy_bw"], "{:.0f}%"),
                  f(r["csr_host_overhead_us"], "{:.1f}"), f(r.get("dense_fwd_bwd_call_ms")),
                  f(r.get("SparseLinear_fwd_bwd_call_ms")), f(r.get("fwd_bwd_speedup_vs_dense"), "{:.2f}x"))
    con.print(t)
    targets = []
    fwd_ok = [r for r in rows if r["fwd_speedup_vs_dense"] is not None]
    targets.append({"target": "forward >= 1.0x dense at every point",
                    "value": min(r["fwd_speedup_vs_dense"] for r in fwd_ok) if fwd_ok else None,
                    "pass": bool(fwd_ok) and all(r["fwd_speedup_vs_dense"] >= 1.0 for r in fwd_ok)})
    hi = [r for r in rows if r["sparsity"] >= 0.9 and r["batch"] <= 16 and r["csr_kernel_speedup_vs_dense_kernel"]]
    targets.append({"target": ">= 2x dense kernel time at sparsity >= 0.9, batch <= 16",
                    "value": min(r["csr_kernel_speedup_vs_dense_kernel"] for r in hi) if hi else None,
                    "pass": bool(hi) and all(r["csr_kernel_speedup_vs_dense_kernel"] >= 2.0 for r in hi)})
    fb = [r for r in rows if r.get("fwd_bwd_speedup_vs_dense") is not None]
    if fb:
        targets.append({"target": "fwd+bwd >= 1.0x dense at every point",
                        "value": min(r["fwd_bwd_speedup_vs_dense"] for r in fb),
                        "pass": all(r["fwd_bwd_speedup_vs_dense"] >= 1.0 for r in fb)})
    ho = [r["csr_host_overhead_us"] for r in rows if r["csr_host_overhead_us"] is not None]
    if ho:
        targets.append({"target": "host overhead per call <= 20 us (median over the sweep)",
                        "value": statistics.median(ho), "pass": statistics.median(ho) <= 20})
    for tg in targets:
        con.print(f"[{'PASS' if tg['pass'] else 'FAIL'}] {tg['target']}: {tg['value']}")
    out = Path(a.out) if a.out else results_dir() / "spmm_cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "spmm_cuda", "machine": machine, "dtype": a.dtype, "backend": backend,
                               "calls_per_loop": a.calls, "reps": a.reps, "elapsed_s": elapsed,
                               "dispatch_cache": sparse_dispatch.cached_decisions(), "results": rows,
                               "targets": targets}, indent=1))
    con.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
