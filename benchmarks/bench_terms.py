"""Quality of the loss terms: logit-only KD against +hidden, two teachers, and both, over seeds.

    PYTHONPATH=. python benchmarks/bench_terms.py --task mnist1d [--seeds 0 1 2] [--search] [--storage runs/terms]
    PYTHONPATH=. python benchmarks/bench_terms.py --task lm      [--seeds 0 1 2] [--search] [--storage runs/terms]

Each stage runs in this process, one worker, the per-worker loop's way (the stage's ``Criterion`` over
``Task.prepare`` / ``Task.forward``, ``loop.build_optimizer`` / ``build_scheduler``, the config's budget):
the teachers (``mnist1d_default``'s CNN; ``lm_default``'s Llama) trained with cross-entropy and cached
under ``--storage``, the second teacher the same model trained with another seed, then the dense student
with the terms of each row. ``--search``: first a small grid over the term weights (the hidden term's weight,
the second teacher's weight) on seed 0, scored on the validation split (never the test split); the rows then
use the best weights. Every row of every seed sees the same data, teachers and step budget
(``--fixed-teachers``: the same two teachers for every student seed). JSON:
benchmarks/results/terms_quality_<task>.json (rewritten after every run, so a stopped run keeps its rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from raydistill.config import config_hash, load_config
from raydistill.distill.loop import build_optimizer, build_scheduler
from raydistill.distill.spec import StageSpec
from raydistill.losses import Criterion
from raydistill.tasks import get_task
from raydistill.utils import machine_info, results_dir, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"mnist1d": "mnist1d_default", "lm": "lm_default"}
ROWS = ("logit", "hidden", "two", "both")


# ---------------------------------------------------------------------------------------------------------
# data


def load_data(cfg, storage: Path):
    """(task, task_info, train rows for distillation, labelled train rows, eval dict) as tensors."""
    task = get_task(cfg.data.task)
    if cfg.data.task == "classification":  # the benchmark's own data set-up (the pipeline's: Task.datasets)
        from raydistill.tasks.classification import load_arrays

        split, extra = load_arrays(cfg, storage)
        x = np.concatenate([split.x_train, extra])
        y = np.concatenate([split.y_train, np.full(len(extra), -1, np.int64)])
        kd = {"x": torch.as_tensor(x, dtype=torch.float32), "y": torch.as_tensor(y)}
        ce = {"x": torch.as_tensor(split.x_train, dtype=torch.float32), "y": torch.as_tensor(split.y_train)}
        ev = {"x": torch.as_tensor(np.concatenate([split.x_val, split.x_test]), dtype=torch.float32),
              "y": torch.as_tensor(np.concatenate([split.y_val, split.y_test])),
              "split": torch.as_tensor([0] * len(split.y_val) + [1] * len(split.y_test))}
        return task, {}, kd, ce, ev
    from raydistill.distill.session import ray_session
    from raydistill.tasks.causal_lm import text_data

    with ray_session(num_cpus=1):  # Ray Data tokenizes and packs the corpus once (cached under storage)
        td = text_data(cfg, storage)
    info = {**td.info(), "seq_len": cfg.data.seq_len}
    train = {"input_ids": torch.as_tensor(td.train, dtype=torch.int64)}
    ev = {"input_ids": torch.as_tensor(np.concatenate([td.val, td.test]), dtype=torch.int64),
          "split": torch.as_tensor([0] * len(td.val) + [1] * len(td.test))}
    return task, info, train, train, ev


# ---------------------------------------------------------------------------------------------------------
# one stage, the per-worker loop's way (one worker)


def train_stage(task, info, spec: StageSpec, model, teachers: dict, train: dict, ev: dict, grad_clip) -> dict:
    torch.manual_seed(spec.seed)
    crit = Criterion(spec.terms, student=task.layout(model), teachers={n: task.layout(t) for n, t in teachers.items()})
    teachers = {n: t for n, t in teachers.items() if n in crit.teacher_names}
    needs = crit.needs()
    data = task.prepare(dict(train), spec, teachers, needs)
    n = len(next(iter(data.values())))
    bs = spec.batch_size
    steps = max(1, n // bs)
    params = list(model.parameters()) + list(crit.parameters())
    opt = build_optimizer(params, spec.optimizer)
    sched = build_scheduler(opt, spec.lr_schedule, spec.epochs * steps, spec.optimizer["lr"])
    t0, loss_sum = time.time(), 0.0
    for epoch in range(1, spec.epochs + 1):
        g = torch.Generator().manual_seed(spec.seed * 100003 + epoch * 1009)  # loop.batches' order (rank 0)
        perm = torch.randperm(n, generator=g)
        model.train()
        loss_sum = 0.0
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            loss = crit(task.forward(model, {k: v[idx] for k, v in data.items()}, spec, teachers, needs))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
    out = task.evaluate(model, ev, teacher=next(iter(teachers.values()), None), task_info=info)
    return {**out, "train_loss": loss_sum / steps, "seconds": time.time() - t0, "steps": spec.epochs * steps}


def spec_of(cfg, task, info, *, kind, terms=None, budget=None, seed=0) -> StageSpec:
    b = budget or cfg.distill
    return StageSpec(stage=kind, task=task.name, kind=kind, model={}, epochs=b.epochs, batch_size=b.batch_size,
                     optimizer=b.optimizer.model_dump(), lr_schedule=b.lr_schedule.model_dump(), seed=seed,
                     progress_dir="", task_info=info, fused_linear=cfg.distill.fused_linear,
                     hard_labels=cfg.distill.transfer_set.hard_labels,
                     **({"terms": tuple(terms)} if terms is not None else {}))


def teacher(cfg, task, info, ce_rows, ev, seed: int, storage: Path):
    """The config's teacher trained with cross-entropy at ``seed`` (cached as a state dict)."""
    t = cfg.teacher
    key = config_hash({"teacher": t.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"), "seed": seed})
    path = storage / "bench_terms_teachers" / f"{key}.pt"
    model = task.build_model({"model": t.model, "kwargs": dict(t.kwargs)}, info)
    if path.is_file():
        model.load_state_dict(torch.load(path))
        metrics = task.evaluate(model, ev, task_info=info)
    else:
        torch.manual_seed(seed)
        model = task.build_model({"model": t.model, "kwargs": dict(t.kwargs)}, info)
        metrics = train_stage(task, info, spec_of(cfg, task, info, kind="ce", budget=t.training, seed=seed), model,
                              {}, ce_rows, ev, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval().requires_grad_(False), metrics


# ---------------------------------------------------------------------------------------------------------
# the rows


def row_terms(cfg, row: str, w: dict) -> list[dict]:
    """The loss of a row: the config's kd_logits + ce (logit-only), + a hidden term on the first teacher,
    + the second teacher's logits, or both."""
    kd, ce = cfg.loss_terms()
    if row in ("two", "both"):
        kd = dict(kd, teachers={"main": 1.0, "second": w["second"]})
    terms = [kd, ce]
    if row in ("hidden", "both"):
        terms.append({"type": "hidden", "weight": w["hidden"], "teacher": "main", "layers": "uniform",
                      "metric": w.get("metric", "cosine"), "projection": True, "key": "bench.hidden"})
    return terms


def run_row(cfg, task, info, train, ev, teachers, row, w, seed) -> dict:
    torch.manual_seed(seed)
    s = cfg.student
    student = task.build_model({"model": s.model, "kwargs": dict(s.kwargs)}, info)
    spec = spec_of(cfg, task, info, kind="kd", terms=row_terms(cfg, row, w), seed=seed)
    ts = {"main": teachers[0]} if row in ("logit", "hidden") else {"main": teachers[0], "second": teachers[1]}
    return train_stage(task, info, spec, student, ts, train, ev, cfg.distill.grad_clip)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--storage", default=str(ROOT / "runs" / "terms"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.path=value")
    ap.add_argument("--search", action="store_true", help="grid over the term weights on seed 0 (validation)")
    ap.add_argument("--hidden-weights", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    ap.add_argument("--second-weights", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--weights", default="hidden=0.5,second=1.0", help="weights without --search")
    ap.add_argument("--fixed-teachers", action="store_true",
                    help="train the two teachers once (seeds 0 and 1000) for every student seed (LM: the teachers "
                         "are most of the time)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    storage = Path(a.storage).resolve()
    out_path = Path(a.out or results_dir() / f"terms_quality_{a.task}.json")
    cfg = load_config(CONFIGS[a.task], a.overrides)
    metric, lower = ("perplexity", True) if a.task == "lm" else ("accuracy", False)
    val = "val_perplexity" if lower else "val_accuracy"
    task, info, train, ce_rows, ev = load_data(cfg, storage)
    doc = {"command": " ".join(["python", "benchmarks/bench_terms.py", *(sys.argv[1:] if argv is None else argv)]),
           "config": CONFIGS[a.task], "overrides": a.overrides, "machine": machine_info("cpu"), "metric": metric,
           "teachers": {}, "search": [], "weights": None, "rows": {}}

    def save():
        doc["loadavg_at_end"] = os.getloadavg()
        write_json_atomic(out_path, doc)

    def teachers_of(seed):
        seed = 0 if a.fixed_teachers else seed
        pair = [teacher(cfg, task, info, ce_rows, ev, seed, storage),
                teacher(cfg, task, info, ce_rows, ev, seed + 1000, storage)]
        doc["teachers"][str(seed)] = {"main": _num(pair[0][1]), "second": _num(pair[1][1])}
        print(f"seed {seed}: teachers {metric} {pair[0][1][metric]:.4f} / {pair[1][1][metric]:.4f}", flush=True)
        return [p[0] for p in pair]

    w = dict((k, float(v)) for k, v in (kv.split("=") for kv in a.weights.split(",")))
    if a.search:  # the weights of the hidden term and of the second teacher, on seed 0's validation split
        ts = teachers_of(a.seeds[0])
        best = {}
        for row, grid in (("hidden", [{"hidden": h} for h in a.hidden_weights]),
                          ("two", [{"second": s} for s in a.second_weights])):
            for g in grid:
                r = run_row(cfg, task, info, train, ev, ts, row, {**w, **g}, a.seeds[0])
                doc["search"].append({"row": row, **g, val: r[val]})
                print(f"search {row} {g}: {val} {r[val]:.4f}", flush=True)
                if row not in best or (r[val] < best[row][1] if lower else r[val] > best[row][1]):
                    best[row] = (g, r[val])
                save()
        w.update(best["hidden"][0])
        w.update(best["two"][0])
    doc["weights"] = w
    rows = a.rows.split(",")
    for seed in a.seeds:
        ts = teachers_of(seed)
        for row in rows:
            r = run_row(cfg, task, info, train, ev, ts, row, w, seed)
            doc["rows"].setdefault(row, {})[str(seed)] = _num(r)
            print(f"seed {seed} {row:7s}: {metric} {r[metric]:.4f}  ({val} {r[val]:.4f}, {r['seconds']:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            save()
    summary = {}
    for row in rows:
        vals = [doc["rows"][row][str(s)][metric] for s in a.seeds]
        summary[row] = {"mean": statistics.mean(vals), "per_seed": vals}
    base = summary.get("logit", {}).get("mean")
    for row, s in summary.items():
        if base:
            s["vs_logit"] = (s["mean"] / base - 1) if lower else (s["mean"] - base)
    doc["summary"] = summary
    save()
    print(f"\n| row | {metric} (mean of {len(a.seeds)} seeds) | vs logit-only | per seed |\n|---|---:|---:|---|")
    for row, s in summary.items():
        vs = "" if "vs_logit" not in s else (f"{100 * s['vs_logit']:+.1f}%" if lower else f"{100 * s['vs_logit']:+.1f} pts")
        print(f"| {row} | {s['mean']:.4f} | {vs} | {', '.join(f'{v:.4f}' for v in s['per_seed'])} |")
    print(out_path)
    return 0


def _num(r: dict) -> dict:
    return {k: v for k, v in r.items() if isinstance(v, (int, float))}


if __name__ == "__main__":
    raise SystemExit(main())
