"""Issue 21: the student-shape search (``raydistill tune lm_prune_search``) and its fronts, with the trials'
CPU latency measured side by side.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_prune_search.py --search runs/<storage>/lm_prune_search \
        [--rounds 15] [--threads 1]

Reads a finished search (``trials.csv``, ``search_config.yaml``, the trials' checkpoints), loads every trial's
student as the evaluation does, and times one eval forward of one sequence (batch 1 x ``data.seq_len``
random token ids) of every student **interleaved in one process**: ``--rounds`` rounds, each timing every
student once (median of 5 calls after 1 warm-up, ``raydistill.distill.steps.measure_latency``); a student's
latency is the median over rounds. On a machine shared with other jobs the absolute times carry the load,
but every student sees the same load, so their ratios hold. Then the fronts of test perplexity against
parameters and against that latency (``raydistill.tune.report.compute_fronts``). Writes
benchmarks/results/prune_search.json (machine, load average, git commit) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    import torch
    import yaml

    from raydistill.config import config_from_dict, load_config
    from raydistill.distill.evaluate import load_checkpoint_model
    from raydistill.distill.steps import measure_latency
    from raydistill.tune import report as rep
    from raydistill.tune.space import apply_trial_config, short_names
    from raydistill.utils import machine_info, results_dir, write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", required=True, help="the search's directory (<storage-path>/<name>)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(results_dir() / "prune_search.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be at least 1")
    search = Path(args.search).expanduser().resolve()
    torch.set_num_threads(args.threads)
    cfg = load_config(search / "search_config.yaml")
    base = cfg.model_dump(mode="json")
    with open(search / "trials.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "TERMINATED" and r["checkpoint_path"]]
    keys = list(cfg.search["space"])
    names = short_names(keys)
    models = {}
    trials = []
    for r in rows:
        over = {k: yaml.safe_load(r[names[k]]) for k in keys}  # trials.csv's column of each searched key
        tcfg = config_from_dict(apply_trial_config(base, over))
        net, _, meta, task, info = load_checkpoint_model(tcfg, r["checkpoint_path"])
        models[r["trial_id"]] = (net.eval(), task, info)
        shape = {k: getattr(net.config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                     "num_key_value_heads", "intermediate_size", "head_dim")}
        trials.append({"trial_id": r["trial_id"], "status": r["status"], "params": over, "shape": shape,
                       "perplexity": float(r["perplexity"]), "val_perplexity": float(r["val_perplexity"]),
                       "model_params": sum(p.numel() for p in net.parameters()),
                       "latency_ms_b1_search": float(r["latency_ms_b1"]) if r["latency_ms_b1"] else None})
    load0, t0 = os.getloadavg(), time.time()
    per_round: dict[str, list[float]] = {t: [] for t in models}
    for _ in range(args.rounds):
        for tid, (net, task, info) in models.items():
            lat = measure_latency(net, lambda b, task=task, info=info: task.latency_input(info, b), (1,), repeats=5,
                                  warmup=1)
            per_round[tid].append(lat["latency_ms_b1"])
    for t in trials:
        ms = sorted(per_round[t["trial_id"]])
        t["latency_ms_b1"] = statistics.median(ms)
        t["latency_spread_ms_b1"] = [ms[len(ms) // 10], ms[(9 * len(ms)) // 10]]
    q = rep.quality_for(cfg.data.task)
    fronts = rep.compute_fronts(trials, q)
    out = {"machine": machine_info("cpu"), "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
           "command": " ".join(["python", "benchmarks/bench_prune_search.py", *(argv or sys.argv[1:])]),
           "search": search.name, "search_config": cfg.search, "threads": args.threads, "rounds": args.rounds,
           "timing_seconds": time.time() - t0, "trials": trials,
           "fronts": {k: [t["trial_id"] for t in v] for k, v in fronts.items() if k.endswith(("params", "latency"))}}
    write_json_atomic(args.out, out)
    print(f"{len(trials)} trials of {search.name}; latency: one sequence of {cfg.data.seq_len} tokens, batch 1, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds; load average {load0[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| " + " | ".join(names[k] for k in keys) + " | shape (layers x hidden, heads, intermediate) "
          "| parameters | test perplexity | ms / sequence | on the parameter front | on the latency front |")
    print("|" + "---|" * len(keys) + "---|---:|---:|---:|:---:|:---:|")
    for t in sorted(trials, key=lambda t: (t["model_params"], t["shape"]["num_hidden_layers"])):
        s = t["shape"]
        print("| " + " | ".join(str(v) for v in t["params"].values())
              + f" | {s['num_hidden_layers']} x {s['hidden_size']}, {s['num_attention_heads']}, "
                f"{s['intermediate_size']} | {t['model_params']:,} | {t['perplexity']:.2f} | "
                f"{t['latency_ms_b1']:.2f} | {'yes' if t['trial_id'] in out['fronts']['perplexity_params'] else ''} | "
                f"{'yes' if t['trial_id'] in out['fronts']['perplexity_latency'] else ''} |")
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
