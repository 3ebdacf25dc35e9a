"""Time the fused kd_loss CUDA kernels per launch configuration (one GPU run; JSON + table).

Runs fwd+bwd and fwd-only of ``raydistill.ops.kd_loss`` (T=2, alpha=0.5, forward KL + CE, mean) at the
issue-13 cases for the generic kernel and each compiled cluster configuration
(``RAYDISTILL_KD_KERNEL=cluster RAYDISTILL_KD_CLUSTER=threads:vectors``), with CUDA events (median of --reps), next to
the device-to-device copy bandwidth. Used to pick the default configuration in kd_loss_cuda_cluster.cu.

    python benchmarks/gpu/kd_cluster_sweep.py --out benchmarks/results/kd_cluster_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from raydistill.bench.kd_loss import machine_info, measure_copy_bandwidth  # noqa: E402
from raydistill.ops import kd_loss  # noqa: E402
from raydistill.utils import cuda_median_ms  # noqa: E402

CASES = [(8192, 128256, torch.bfloat16), (4096, 32000, torch.float32), (4096, 128256, torch.float32),
         (16384, 32000, torch.bfloat16)]
CONFIGS = ["generic", "default", "256:2", "256:4", "512:1", "512:2", "512:4", "1024:1", "1024:2"]


def timed(fn, reps):
    return cuda_median_ms(fn, reps=reps, warmup=1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/kd_cluster_sweep.json")
    a = p.parse_args()
    dev = torch.device("cuda")
    bw = measure_copy_bandwidth(dev)
    rows = []
    for N, V, dt in CASES:
        g = torch.Generator(device=dev).manual_seed(0)
        s = (torch.randn(N, V, device=dev, generator=g) * 3).to(dt).requires_grad_(True)
        t = (torch.randn(N, V, device=dev, generator=g) * 3).to(dt)
        y = torch.randint(0, V, (N,), device=dev, generator=g)
        esz = s.element_size()
        floor_fb = N * V * 3 * esz / bw * 1e3
        floor_f = N * V * 2 * esz / bw * 1e3
        ref_loss = None
        for cfg in CONFIGS:
            os.environ.pop("RAYDISTILL_KD_CLUSTER", None)
            os.environ["RAYDISTILL_KD_KERNEL"] = "generic" if cfg == "generic" else "cluster"
            if cfg not in ("generic", "default"):
                os.environ["RAYDISTILL_KD_CLUSTER"] = cfg

            def fb():
                s.grad = None
                kd_loss(s, t, y, temperature=2.0, alpha=0.5).backward()

            def f():
                with torch.no_grad():
                    return kd_loss(s, t, y, temperature=2.0, alpha=0.5)

            try:
                loss = float(f())
                tfb, tf = timed(fb, a.reps), timed(f, a.reps)
            except RuntimeError as e:
                rows.append({"N": N, "V": V, "dtype": str(dt), "config": cfg, "error": str(e)[:300]})
                print(f"{N}x{V} {dt} {cfg}: ERROR {e}", flush=True)
                continue
            if ref_loss is None:
                ref_loss = loss
            r = {"N": N, "V": V, "dtype": str(dt).replace("torch.", ""), "config": cfg, "loss": loss,
                 "loss_rel_diff_vs_generic": abs(loss - ref_loss) / abs(ref_loss), "fwd_bwd_ms": tfb, "fwd_ms": tf,
                 "fwd_bwd_floor_ms": floor_fb, "fwd_floor_ms": floor_f, "fwd_bwd_frac": floor_fb / tfb,
                 "fwd_frac": floor_f / tf}
            rows.append(r)
            print(f"{N}x{V} {r['dtype']:>8} {cfg:>8}: fwd+bwd {tfb:.3f} ms ({100 * r['fwd_bwd_frac']:.0f}% of "
                  f"floor {floor_fb:.3f}), fwd {tf:.3f} ms ({100 * r['fwd_frac']:.0f}%), loss {loss:.6f}", flush=True)
        del s, t, y
        torch.cuda.empty_cache()
    os.environ.pop("RAYDISTILL_KD_KERNEL", None)
    os.environ.pop("RAYDISTILL_KD_CLUSTER", None)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": machine_info(dev), "copy_bandwidth_GBps": bw / 1e9,
                                       "results": rows}, indent=1))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
