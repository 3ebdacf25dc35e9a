"""The causal-LM targets: the shipped ``lm_default`` job (`raydistill distill lm_default`) for 3 seeds.

    .venv/bin/python benchmarks/bench_lm_targets.py [--seeds 0 1 2] [--storage-path runs/lm_targets]
                                                    [--config lm_default] [--set key=value ...]
                                                    [--reuse SEED=RUN_DIR ...]

Per seed (the teacher is trained once, with the first seed, and shared): test and validation perplexity of
the student trained from scratch (``baseline``), the dense distilled student and the 50%-sparse distilled
student (``--reuse``: a seed's finished ``raydistill distill`` run of the same config, read back instead of
run again), and each stage's optimizer steps and training tokens from its ``epochs.jsonl`` (the three must
match: same tokens and steps). Targets: distilled perplexity >= 5% lower than the baseline's; the sparse
student's within 5% of the dense one's. Prints a table, writes benchmarks/results/lm_targets.json (machine
info, load average, git commit) after every seed, so a stopped run keeps the seeds it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from raydistill.config import load_config
from raydistill.distill import run_distill
from raydistill.utils import machine_info, results_dir, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


STAGES = ("baseline", "dense_student", "student")


def stage_budget(run_dir: Path, stage: str) -> dict:
    """Optimizer steps and training tokens of a stage, from its per-epoch log (last line per epoch)."""
    by_epoch = {}
    for line in (run_dir / stage / "epochs.jsonl").read_text().splitlines():
        m = json.loads(line)
        by_epoch[int(m["epoch"])] = m
    rows = [by_epoch[k] for k in sorted(by_epoch)]
    return {"epochs": len(rows), "steps": int(rows[-1]["global_step"]),
            "tokens": int(round(sum(m["tokens_per_s"] * m["epoch_seconds"] for m in rows)))}


def _summary(rows: list, args, argv, machine: dict, t_all: float) -> dict:
    cols = ("baseline", "dense_student", "student", "distilled_vs_baseline", "sparse_vs_dense", "wall_seconds")
    return {"machine": machine, "loadavg_at_end": os.getloadavg(),
            "command": " ".join(["python", "benchmarks/bench_lm_targets.py", *(argv or sys.argv[1:])]),
            "config": args.config, "overrides": args.overrides, "total_wall_seconds": time.time() - t_all,
            "seeds_requested": args.seeds, "seeds_done": [r["seed"] for r in rows],
            "rows": rows, "median": {k: statistics.median(r[k] for r in rows) for k in cols},
            "targets_met": {
                "distilled_ppl_5pct_below_baseline": all(r["distilled_vs_baseline"] <= -0.05 for r in rows),
                "sparse_within_5pct_of_dense": all(r["sparse_vs_dense"] <= 0.05 for r in rows)},
            "same_steps_and_tokens": all(r["same_steps_and_tokens"] for r in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--storage-path", default=str(ROOT / "runs" / "lm_targets"))
    ap.add_argument("--config", default="lm_default")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(results_dir() / "lm_targets.json"))
    ap.add_argument("--reuse", action="append", default=[], metavar="SEED=RUN_DIR",
                    help="take this seed's figures from a finished `raydistill distill` run of the same config "
                         "and seed (its report.json and epochs.jsonl) instead of running it again")
    args = ap.parse_args(argv)
    reuse = {int(k): Path(v) for k, v in (r.split("=", 1) for r in args.reuse)}
    machine = machine_info("cpu")
    rows, t_all, teacher_ck = [], time.time(), None
    for seed in args.seeds:
        extra = [f"teacher.checkpoint={teacher_ck}"] if teacher_ck else []
        cfg = load_config(args.config, [*args.overrides, f"run.seed={seed}", *extra])
        t0 = time.time()
        if seed in reuse:
            r = json.loads((reuse[seed] / "report.json").read_text())
            if r["config"]["run"]["seed"] != seed or {k: r["config"][k] for k in ("teacher", "student", "data",
                                                                                  "distill", "compression")} \
                    != {k: cfg.model_dump(mode="json")[k] for k in ("teacher", "student", "data", "distill",
                                                                    "compression")}:
                raise SystemExit(f"--reuse {seed}={reuse[seed]}: that run has another seed or config")
            t0 -= r["wall_seconds"]
        else:
            r = run_distill(cfg, storage_path=args.storage_path, name=f"{cfg.run.name}_seed{seed}", progress=False)
        teacher_ck = teacher_ck or r["teacher"]["path"]
        row = {"seed": seed, "teacher": r["teacher"]["metrics"].get("perplexity"),
               "teacher_cached": r["teacher"]["cached"], "baseline": r["baseline"]["perplexity"],
               "dense_student": r["dense_student"]["perplexity"], "student": r["student"]["perplexity"],
               "student_sparsity": r["student"]["sparsity"],
               "val": {s: r[s].get("val_perplexity") for s in STAGES},
               "budget": {s: stage_budget(Path(r["run_dir"]), s) for s in STAGES},
               "teacher_agreement": r["student"].get("teacher_agreement"), "wall_seconds": time.time() - t0,
               "timings": r["timings"], "loadavg_after": os.getloadavg(),
               "run_dir": r["run_dir"], "reused": seed in reuse}
        row["distilled_vs_baseline"] = row["dense_student"] / row["baseline"] - 1
        row["sparse_vs_dense"] = row["student"] / row["dense_student"] - 1
        if all(row["val"][s] for s in STAGES):
            row["val_distilled_vs_baseline"] = row["val"]["dense_student"] / row["val"]["baseline"] - 1
        budgets = [row["budget"][s] for s in STAGES]
        row["same_steps_and_tokens"] = all(b == budgets[0] for b in budgets)
        rows.append(row)
        print(row, flush=True)
        out = _summary(rows, args, argv, machine, t_all)  # after every seed: a stopped run keeps its seeds
        write_json_atomic(args.out, out)
    print("| seed | teacher ppl | baseline ppl | dense distilled ppl | 50%-sparse ppl | distilled vs baseline "
          "| sparse vs dense | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['teacher']:.2f} | {r['baseline']:.2f} | {r['dense_student']:.2f} | "
              f"{r['student']:.2f} | {r['distilled_vs_baseline']:+.1%} | {r['sparse_vs_dense']:+.1%} | "
              f"{r['wall_seconds']:.0f} |")
    print(f"targets met: {out['targets_met']}\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
