"""Run the default `raydistill tune` search, time it, check issue 5's targets, publish the results.

    .venv/bin/python benchmarks/bench_tune_search.py            # run + publish
    .venv/bin/python benchmarks/bench_tune_search.py --only-publish --name mnist1d_search_measured

Copies trials.csv / pareto.json / pareto.png / best_config.yaml to benchmarks/results/tune_mnist1d/,
writes summary.json there (wall time, trials, % stopped by ASHA, front, targets met or not) and
rewrites the measured section of docs/tune.md between its markers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "tune_mnist1d"
DOC = ROOT / "docs" / "tune.md"
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="mnist1d_search_measured")
    ap.add_argument("--storage-path", default=str(ROOT / "runs"))
    ap.add_argument("--only-publish", action="store_true", help="publish an existing search, do not run")
    ap.add_argument("--wall-s", type=float, default=None, help="with --only-publish: the measured wall time")
    args = ap.parse_args()
    exp = Path(args.storage_path) / args.name
    cmd = [str(ROOT / ".venv" / "bin" / "raydistill"), "tune", "--storage-path", args.storage_path,
           "--name", args.name]
    wall = args.wall_s
    if not args.only_publish:
        if exp.exists():
            print(f"{exp} exists; pick another --name or --only-publish", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        rc = subprocess.call(cmd, cwd=ROOT)
        wall = time.monotonic() - t0
        if rc not in (0, 1):
            print(f"raydistill tune failed (rc {rc})", file=sys.stderr)
            return rc
    return publish(exp, wall, " ".join(["raydistill", "tune", "--name", args.name]))


def publish(exp: Path, wall: float | None, command: str) -> int:
    with open(exp / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    doc = json.loads((exp / "pareto.json").read_text())
    front = doc["front"]
    state = json.loads((exp / "search_state.json").read_text())
    fin = [r for r in rows if r["status"] == "TERMINATED"]
    stopped = [r for r in fin if r["stopped_early"] == "True"]
    dense = [float(r["accuracy"]) for r in fin if float(r["sparsity"]) == 0.0 and r["stopped_early"] == "False"]
    sparse90 = [float(r["accuracy"]) for r in fin if float(r["sparsity"]) >= 0.9]
    best_dense = max(dense) if dense else None
    best_90 = max(sparse90) if sparse90 else None
    if wall is None and state.get("wall_s"):
        wall = float(state["wall_s"][-1]["total_s"])
    summary = {
        "command": command, "wall_s": round(wall, 1) if wall else None,
        "fit_s": state["wall_s"][-1]["fit_s"] if state.get("wall_s") else None,
        "trials": len(rows), "finished": len(fin), "stopped_early": len(stopped),
        "stopped_fraction": round(len(stopped) / max(1, len(rows)), 3), "front_size": len(front),
        "teacher_accuracy": doc.get("teacher_accuracy"), "baseline_accuracy": doc.get("baseline_accuracy"),
        "best_dense_accuracy": best_dense, "best_accuracy_sparsity_ge_0.9": best_90,
        "targets": {
            "wall_le_15min": bool(wall is not None and wall <= 900), "trials_ge_12": len(rows) >= 12,
            "asha_stopped_ge_40pct": len(stopped) >= 0.4 * len(rows), "front_ge_3": len(front) >= 3,
            "sparse90_within_2pts_of_dense": bool(best_dense is not None and best_90 is not None
                                                  and best_90 >= best_dense - 0.02),
        },
        "plan": state.get("plan"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_avg_at_publish": os.getloadavg(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for f in ("trials.csv", "pareto.json", "pareto.png", "best_config.yaml"):
        if (exp / f).exists():
            shutil.copy2(exp / f, OUT / f)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    sys.path.insert(0, str(ROOT))
    from raydistill.tune.report import front_markdown

    t = summary["targets"]
    ok = lambda b: "met" if b else "**not met**"  # noqa: E731
    md = "\n".join([
        BEGIN,
        f"Command: `{command}` (then `python benchmarks/bench_tune_search.py --only-publish`; or both at once: "
        "`python benchmarks/bench_tune_search.py`). Results: `benchmarks/results/tune_mnist1d/` "
        "(`pareto.png`, `pareto.json`, `trials.csv`, `summary.json`).",
        "",
        f"* wall time {summary['wall_s']:.0f} s incl. Ray start, teacher and baseline "
        f"(Tune loop {summary['fit_s']:.0f} s) -- target <= 15 min: {ok(t['wall_le_15min'])}"
        if summary["wall_s"] else "* wall time: not recorded",
        f"* {summary['trials']} trials x {max(int(r['epochs_configured']) for r in rows)} epochs, "
        f"{state.get('plan', {}).get('max_concurrent', '?')} at once; ASHA stopped {summary['stopped_early']} "
        f"({100 * summary['stopped_fraction']:.0f}%) before their last epoch -- target >= 40%: "
        f"{ok(t['asha_stopped_ge_40pct'])}",
        f"* front: {summary['front_size']} points -- target >= 3: {ok(t['front_ge_3'])}",
        f"* best accuracy at sparsity >= 0.9: {best_90 if best_90 is not None else '-'}; best dense "
        f"(sparsity 0, all epochs): {best_dense if best_dense is not None else '-'} -- target within 2 "
        f"points: {ok(t['sparse90_within_2pts_of_dense'])}",
        f"* teacher {summary['teacher_accuracy']}, student from scratch {summary['baseline_accuracy']}",
        "",
        front_markdown(front),
        "",
        "![accuracy vs compression](../benchmarks/results/tune_mnist1d/pareto.png)",
        END,
    ])
    text = DOC.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + md + text[text.index(END) + len(END):]
    else:
        text = text.replace("MEASURED_SECTION", md)
    DOC.write_text(text)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
