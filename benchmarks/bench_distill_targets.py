"""The README's distillation targets on this machine: the default config (`raydistill distill`) for 3 seeds.

    .venv/bin/python benchmarks/bench_distill_targets.py [--seeds 0 1 2] [--storage-path runs/targets]

Per seed: teacher (CNN) accuracy, baseline (student from scratch), dense distilled student, 80%-sparse
distilled student, and the wall time of the whole job. Writes benchmarks/results/distill_targets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from raydistill.config import load_config
from raydistill.distill import run_distill

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--storage-path", default=str(ROOT / "runs" / "targets"))
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_targets.json"))
    args = ap.parse_args(argv)
    rows = []
    load_before = os.getloadavg()
    t_all = time.time()
    for seed in args.seeds:
        cfg = load_config(args.config, [*args.overrides, f"run.seed={seed}"])
        t0 = time.time()
        r = run_distill(cfg, storage_path=args.storage_path, name=f"{cfg.run.name}_seed{seed}", progress=False)
        row = {"seed": seed, "teacher": r["teacher"]["accuracy"], "teacher_cached": r["teacher"]["cached"],
               "baseline": r["baseline"]["accuracy"], "dense_student": r["dense_student"]["accuracy"],
               "student": r["student"]["accuracy"], "student_sparsity": r["student"]["sparsity"],
               "compression_ratio": r["student"]["compression_ratio"], "wall_seconds": time.time() - t0,
               "timings": r["timings"], "loadavg_after": os.getloadavg()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ("teacher", "baseline", "dense_student", "student", "wall_seconds")
    for r in rows:
        r["gain"] = r["student"] - r["baseline"]
        r["sparse_minus_dense"] = r["student"] - r["dense_student"]
    cols = cols + ("gain", "sparse_minus_dense")
    summ = {k: statistics.mean(r[k] for r in rows) for k in cols}
    spread = {k: (max(r[k] for r in rows) - min(r[k] for r in rows)) / 2 for k in cols}
    checks = {
        "teacher_ge_90": all(r["teacher"] >= 0.90 for r in rows),
        "student_ge_baseline_plus_10": all(r["student"] - r["baseline"] >= 0.10 for r in rows),
        "sparse_within_2_of_dense": all(r["dense_student"] - r["student"] <= 0.02 for r in rows),
    }
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": sys.version.split()[0], "loadavg_before": load_before,
                       "loadavg_after": os.getloadavg()},
           "command": " ".join([".venv/bin/python", "benchmarks/bench_distill_targets.py", *(argv or sys.argv[1:])]),
           "total_wall_seconds": time.time() - t_all, "spread_is": "half the min-max range",
           "config": args.config or "tune_configs/mnist1d_default.yaml", "overrides": args.overrides,
           "rows": rows, "mean": summ, "spread": spread,
           "targets_met": checks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| seed | teacher | baseline | dense student | 80%-sparse student | gain | sparse-dense | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['teacher']:.1%} | {r['baseline']:.1%} | {r['dense_student']:.1%} | "
              f"{r['student']:.1%} | {100 * (r['student'] - r['baseline']):+.1f} | "
              f"{100 * (r['student'] - r['dense_student']):+.1f} | {r['wall_seconds']:.0f} |")
    pct = lambda k: f"{100 * summ[k]:.1f} ± {100 * spread[k]:.1f}"  # noqa: E731
    print(f"| mean ± spread | {pct('teacher')} | {pct('baseline')} | {pct('dense_student')} | {pct('student')} | "
          f"{100 * summ['gain']:+.1f} ± {100 * spread['gain']:.1f} | {100 * summ['sparse_minus_dense']:+.1f} ± "
          f"{100 * spread['sparse_minus_dense']:.1f} | {summ['wall_seconds']:.0f} ± {spread['wall_seconds']:.0f} |")
    print(json.dumps(checks))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
