"""Which library runs which quantized linear on this CPU (torch 2.13): the probe behind docs/quantize.md.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_quant_backends.py [--threads 2] [--sizes 512x512x256 4096x4096x16]

For each size (out x in x batch): fp32 nn.Linear; torch.ao dynamic int8 (fbgemm, per-channel weights);
torchao 0.x ``quantize_`` with Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
Int4WeightOnlyConfig(group 32), IntxWeightOnlyConfig(int4, group 32) when torchao is importable (else
"not installed"); raydistill's QuantizedLinear (int8 + int8 activations -> torch.ao fbgemm; int8
weight-only and int4 -> dequantize + fp32 matmul). Median ms per call, interleaved blocks; max abs error
vs fp32; bytes of the stored weight. Writes benchmarks/results/quant_backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore")


def _torchao_candidates():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except Exception as exc:  # noqa: BLE001
        return {}, f"not installed ({type(exc).__name__})"
    cands = {}
    import torchao.quantization as tq

    def add(name, make):
        try:
            cands[name] = make()
        except Exception as exc:  # noqa: BLE001
            cands[name] = exc

    add("torchao Int8WeightOnly", lambda: tq.Int8WeightOnlyConfig())
    add("torchao Int8DynAct+Int8Weight", lambda: tq.Int8DynamicActivationInt8WeightConfig())
    add("torchao Int4WeightOnly g32", lambda: tq.Int4WeightOnlyConfig(group_size=32))
    from torchao.quantization.granularity import PerGroup

    add("torchao IntxWeightOnly int4 g32", lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                         granularity=PerGroup(32)))
    return {"quantize_": quantize_, **cands}, torchao.__version__


def main(argv=None) -> int:
    from raydistill.compress.quantize import QuantizedLinear

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", nargs="+", default=["512x512x256", "4096x4096x16"])
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_backends.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ao, ao_version = _torchao_candidates()
    results = []
    load_before = os.getloadavg()
    for size in args.sizes:
        out_f, in_f, batch = (int(v) for v in size.split("x"))
        torch.manual_seed(0)
        lin = nn.Linear(in_f, out_f)
        x = torch.randn(batch, in_f)
        with torch.no_grad():
            ref = lin(x)
        models, status = {"fp32 nn.Linear": lin}, {}
        dyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
        models["torch.ao dynamic int8 (fbgemm)"] = dyn
        for name, cfg in ao.items():
            if name == "quantize_":
                continue
            if isinstance(cfg, Exception):
                status[name] = f"config unavailable: {type(cfg).__name__}: {str(cfg)[:120]}"
                continue
            m = nn.Sequential(nn.Linear(in_f, out_f))
            m[0].load_state_dict(lin.state_dict())
            try:
                ao["quantize_"](m, cfg)
                with torch.no_grad():
                    m(x)
                models[name] = m
            except Exception as exc:  # noqa: BLE001
                status[name] = f"fails on CPU: {type(exc).__name__}: {str(exc)[:120]}"
        for label, kw in (("raydistill int8+act int8 (fbgemm)", dict(bits=8, activations="int8")),
                          ("raydistill int8 weight-only", dict(bits=8)),
                          ("raydistill int4 g32 weight-only", dict(bits=4, group_size=32))):
            models[label] = QuantizedLinear.from_linear(lin, **kw)
        times = {k: [] for k in models}
        with torch.no_grad():
            for m in models.values():
                for _ in range(3):
                    m(x)
            for _ in range(args.blocks):
                for k, m in models.items():
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        m(x)
                        times[k].append(time.perf_counter() - t0)
            for k, m in models.items():
                err = float((m(x) - ref).abs().max())
                qb = m.nbytes() if isinstance(m, QuantizedLinear) else None
                results.append({"size": size, "method": k, "ms": 1e3 * statistics.median(times[k]), "max_abs_err": err,
                                "stored_bytes": qb})
        for k, v in status.items():
            results.append({"size": size, "method": k, "ms": None, "status": v})
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    doc = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "threads": args.threads}, "torchao": ao_version, "loadavg_before": load_before,
           "loadavg_after": os.getloadavg(), "git_commit": commit, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"torchao: {ao_version}; threads {args.threads}; load {load_before[0]:.1f}")
    print("| size (out x in x batch) | method | ms/call | max abs err vs fp32 | note |")
    print("|---|---|---:|---:|---|")
    for r in results:
        ms = "" if r["ms"] is None else f"{r['ms']:.3f}"
        err = "" if r.get("max_abs_err") is None else f"{r['max_abs_err']:.4f}"
        print(f"| {r['size']} | {r['method']} | {ms} | {err} | {r.get('status', '')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
