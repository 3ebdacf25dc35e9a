"""``raydistill bench spmm-int8``: int8 SparseLinear vs fp32 SparseLinear vs torch.ao dynamic-int8 dense
(``quantize_dynamic``, fbgemm) vs fp32 dense, on CPU with fp32 activations (the layers' inputs).

``int8 SL`` is the layer as ``SparseLinear.quantize(bits=8, index="csr")`` builds it: int16 dynamic
activations (``raydistill::spmm_int8_a16``, the default). Also timed: the same layer weight-only
(``activations=None``: x kept in fp32, ``raydistill::spmm_int8``) and with the row-bitmap index layout.

Side by side in one run, in both timing modes of ``raydistill bench spmm`` (``turn``: single calls in
turn; ``blocks``: interleaved blocks), median forward wall times per shape, batch and sparsity; plus the
weight bytes of each layer at their real bit widths. torchao's int8 dense paths are timed too when
torchao is installed and runs here (``--torchao``). Writes ``benchmarks/results/spmm_int8_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from raydistill.bench.spmm import _f, _machine, _ms, _ratio, _timer


def _torchao_int8(lin):
    """torchao's int8 weight-only and dynamic-activation dense linears, when they run here; else {}."""
    import copy

    import torch

    out = {}
    try:
        import torchao.quantization as tq
    except Exception:  # noqa: BLE001 -- not installed / incompatible: reported as absent
        return out
    for name, cfg in (("torchao_int8_weight_only", "Int8WeightOnlyConfig"),
                      ("torchao_int8_dyn_act", "Int8DynamicActivationInt8WeightConfig")):
        try:
            m = torch.nn.Sequential(copy.deepcopy(lin))
            tq.quantize_(m, getattr(tq, cfg)())
            with torch.no_grad():
                m(torch.randn(2, lin.in_features))
            out[name] = m
        except Exception:  # noqa: BLE001 -- a config that does not run on this build is skipped
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydistill bench spmm-int8", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096", help="comma list of OUTxIN (default 4096x4096)")
    p.add_argument("--batches", default="16", help="comma list of batch sizes (default 16)")
    p.add_argument("--sparsities", default="0.9", help="comma list (default 0.9)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per method (x3 in turn mode)")
    p.add_argument("--timing", choices=("both", "turn", "blocks"), default="both")
    p.add_argument("--torchao", action="store_true", help="also time torchao's int8 dense linears if installed")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/spmm_int8_cpu.json)")
    a = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from rich.console import Console
    from rich.table import Table

    from raydistill._build import load_extension, op_backend
    from raydistill.ops.sparse import SparseLinear

    con = Console(width=max(Console().width, 160))
    torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    st = load_extension()
    backend = op_backend("spmm_int8", "cpu")
    if backend != "compiled":
        con.print(f"[yellow]warning: raydistill::spmm_int8 is not compiled ({st.reason}); timing the reference[/yellow]")
    modes = ("turn", "blocks") if a.timing == "both" else (a.timing,)
    timer = _timer("cpu")
    g = torch.Generator().manual_seed(0)
    rows = []
    t_start = time.perf_counter()
    for sh in a.shapes.split(","):
        out_f, in_f = (int(v) for v in sh.lower().split("x"))
        lin = torch.nn.Linear(in_f, out_f)
        from torch.ao.quantization import quantize_dynamic

        ao = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        tao = _torchao_int8(lin) if a.torchao else {}
        for s in (float(v) for v in a.sparsities.split(",")):
            mask = torch.rand(out_f, in_f, generator=g) >= s
            sl = SparseLinear.from_dense(lin, mask)
            q = sl.quantize(bits=8, index="csr")  # uint16 columns, int16 dynamic activations (the default)
            qw = sl.quantize(bits=8, index="csr", activations=None)  # weight-only: x stays fp32
            qb = sl.quantize(bits=8, index="bitmap")
            w, b = lin.weight.detach(), lin.bias.detach()
            dense_bytes = 4 * out_f * in_f
            bytes_ = {"dense_fp32": dense_bytes, "ao_dynamic_int8_dense": out_f * in_f + 4 * out_f,
                      "sparse_linear_fp32": sl.csr_bytes(), "sparse_linear_int8": q.csr_bytes(),
                      "sparse_linear_int8_bitmap": qb.csr_bytes()}
            for n in (int(v) for v in a.batches.split(",")):
                x = torch.randn(n, in_f, generator=g)
                fns = {"int8_sl": lambda: q(x), "int8_sl_weight_only": lambda: qw(x),
                       "int8_sl_bitmap": lambda: qb(x), "fp32_sl": lambda: sl(x),
                       "ao_dyn_int8": lambda: ao(x),
                       "dense_fp32": lambda: F.linear(x, w, b)}
                fns.update({k: (lambda m=m: m(x)) for k, m in tao.items()})
                row = {"shape": [out_f, in_f], "batch": n, "sparsity": s, "nnz": sl.nnz, "bytes": bytes_,
                       "bytes_vs_dense_fp32": {k: round(v / dense_bytes, 4) for k, v in bytes_.items()}}
                for mode in modes:
                    with torch.no_grad():
                        tm = (timer.turn if mode == "turn" else timer.interleaved)(fns, a.repeats, 1.0)
                    m = {f"{k}_ms": _ms(v) for k, v in tm.items()}
                    m["int8_sl_vs_ao_dyn_int8"] = _ratio(m["ao_dyn_int8_ms"], m["int8_sl_ms"])
                    m["int8_sl_vs_fp32_sl"] = _ratio(m["fp32_sl_ms"], m["int8_sl_ms"])
                    m["int8_sl_vs_dense_fp32"] = _ratio(m["dense_fp32_ms"], m["int8_sl_ms"])
                    m["int8_sl_weight_only_vs_fp32_sl"] = _ratio(m["fp32_sl_ms"], m["int8_sl_weight_only_ms"])
                    row[mode] = m
                    con.print(f"  {out_f}x{in_f} s={s} N={n} [{mode:>6}] " +
                              " | ".join(f"{k} {v}" for k, v in m.items() if k.endswith("_ms")), highlight=False)
                rows.append(row)
    elapsed = time.perf_counter() - t_start

    t = Table(title=f"int8 SparseLinear vs fp32 SparseLinear vs torch.ao dynamic int8 dense (cpu, fp32 activations, "
                    f"{threads} threads; median ms)")
    extra = [k for k in ("torchao_int8_weight_only", "torchao_int8_dyn_act")
             if any(f"{k}_ms" in r[mode] for r in rows for mode in modes)]
    short = {"torchao_int8_weight_only": "torchao w8", "torchao_int8_dyn_act": "torchao w8a8"}
    for c in ["shape", "batch", "sparsity", "timing", "int8 SL", "int8 SL w-only", "int8 SL bitmap", "fp32 SL",
              "ao dyn int8", "dense fp32",
              *(short[k] for k in extra),
              "x ao int8", "x fp32 SL", "int8 SL bytes"]:
        t.add_column(c, justify="right")
    for r in rows:
        for mode in modes:
            m = r[mode]
            t.add_row(f"{r['shape'][0]}x{r['shape'][1]}", str(r["batch"]), f"{r['sparsity']:.2f}", mode,
                      _f(m["int8_sl_ms"]), _f(m["int8_sl_weight_only_ms"]), _f(m["int8_sl_bitmap_ms"]),
                      _f(m["fp32_sl_ms"]), _f(m["ao_dyn_int8_ms"]), _f(m["dense_fp32_ms"]),
                      *(_f(m.get(f"{k}_ms")) for k in extra), _f(m["int8_sl_vs_ao_dyn_int8"], "x"),
                      _f(m["int8_sl_vs_fp32_sl"], "x"), f"{100 * r['bytes_vs_dense_fp32']['sparse_linear_int8']:.1f}%")
    con.print(t)
    out = Path(a.out) if a.out else Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "spmm_int8_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "spmm_int8", "argv": argv if argv is not None else [], "device": "cpu",
           "activations": "float32", "int8_sl": "SparseLinear.quantize(bits=8, index='csr'): int16 dynamic activations", "backend": backend, "machine": _machine("cpu", threads),
           "timing_modes": list(modes), "elapsed_s": round(elapsed, 1), "results": rows}
    out.write_text(json.dumps(doc, indent=1))
    con.print(f"wrote {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
