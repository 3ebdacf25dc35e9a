"""Issue 21: make the student by pruning the teacher (Minitron). ``lm_default``'s teacher (4 layers x 256)
and corpus.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_prune_teacher.py [--seeds 0 1 2] \
        [--calibration-blocks 64] [--storage-path runs/prune_teacher] [--config lm_default] [--set key=value ...]

**Pruning only (default; no training).** The teacher is trained once (or reused from the storage's teacher
cache, ``raydistill distill`` trains the same one). Per seed, a calibration sample of
``--calibration-blocks`` training blocks is drawn (the seed picks the blocks) and the teacher is pruned,
with each ranking, to three shapes; the test perplexity right after pruning is recorded:

* ``depth``:   4 -> 2 layers (width kept): ``block_importance``, ``perplexity`` and ``random`` (the seed
  picks the layers);
* ``width``:   hidden 256 -> 128, 4 heads of 64 -> 2, intermediate 688 -> 344 (4 layers kept):
  ``activation`` vs ``random`` channels / heads / units;
* ``student``: ``lm_default``'s student shape (2 layers x 128; its 4 heads of 32 made as 2 heads of the
  teacher's 64: the same q/k/v/o shapes): depth ranking + activation vs random + random.

Target: both importance rankings beat the random choice on every seed (perplexity before training). With 4
layers there are only 6 choices of 2, so a seed's random draw can be the ranking's own choice: that is a
tie and counts as not losing; the depth rankings must also beat the expected random choice, the mean
perplexity over all 6 (each measured; the JSON lists them and each ranking's place among them).
Writes benchmarks/results/prune_teacher.json (machine, load average, git commit).

**Distillation (``--distill``, instead of the above).** Per seed, two ``raydistill distill`` runs of the
config with ``student.init.from: teacher``, the teacher above (``teacher.checkpoint``: the same for every
seed), ``compression.sparsity=0`` (every student dense), ``run.seed`` and ``student.init.seed`` = the seed:

* ``student_shape``: the config's student shape (2 x 128): its ``student`` is the teacher pruned to it and
  distilled, its ``dense_student`` the same shape distilled from random init, its ``baseline`` that shape
  from scratch;
* ``depth_only``: ``student.init.num_hidden_layers`` = the student's layers, the teacher's width (2 x 256).

Every student of a run trains the same epochs on the same blocks. Targets: ``student_shape``'s pruned
student at least 10% below its random-init one (test perplexity), on every seed; ``depth_only``'s pruned
student within 10% of the teacher's perplexity, on every seed. Writes
benchmarks/results/prune_teacher_distill.json; ``--reuse-runs`` reads runs that already finished.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# shape name -> (target, [(label, depth_ranking, width_ranking)])
DEPTH = [("block_importance", "block_importance", "activation"), ("perplexity", "perplexity", "activation"),
         ("random", "random", "random")]
WIDTH = [("activation", "block_importance", "activation"), ("random", "block_importance", "random")]
STUDENT = [("block_importance+activation", "block_importance", "activation"),
           ("perplexity+activation", "perplexity", "activation"), ("random", "random", "random")]


def shapes(teacher, student_config: dict) -> dict:
    from raydistill.compress import student_target

    student, notes = student_target(teacher, student_config)
    width = {k: v for k, v in student.items() if k != "num_hidden_layers"}
    return {"depth": ({"num_hidden_layers": student["num_hidden_layers"]}, DEPTH, []),
            "width": (width, WIDTH, notes),
            "student": (student, STUDENT, notes)}


def load_teacher_and_data(cfg, storage: Path):
    """(teacher model in eval mode, TeacherArtifact, CorpusInfo): trains the teacher if it is not cached."""
    from raydistill.distill.checkpointing import load_weights
    from raydistill.distill.session import ray_session
    from raydistill.distill.teachers import ensure_teacher
    from raydistill.models import build_model
    from raydistill.tasks.causal_lm import text_data

    with ray_session():
        art = ensure_teacher(cfg, storage)
        td = text_data(cfg, storage)
    net = build_model(art.model, vocab_size=td.vocab_size)
    load_weights(net, art.path)
    return net.eval(), art, td


def pruning_only(args, argv) -> int:
    import copy

    from raydistill.compress import prune_to_shape
    from raydistill.compress.structured_lm import calibration_sample
    from raydistill.config import load_config
    from raydistill.tasks.causal_lm import lm_metrics
    from raydistill.utils import machine_info, write_json_atomic

    machine = machine_info("cpu")
    t_all = time.time()
    cfg = load_config(args.config, args.overrides)
    storage = Path(args.storage_path).expanduser().resolve()
    teacher, art, td = load_teacher_and_data(cfg, storage)
    train = torch.from_numpy(td.train).long()
    test = torch.from_numpy(td.test).long()

    def ppl(m):
        return lm_metrics(m, test, td.pad_id, td.vocab_size)["perplexity"]

    teacher_ppl = ppl(teacher)
    targets = shapes(teacher, cfg.student.kwargs["config"])
    subsets = every_layer_subset(teacher, targets["depth"][0]["num_hidden_layers"], ppl)
    expected_random = statistics.mean(r["perplexity"] for r in subsets)
    rows = []
    for seed in args.seeds:
        calib = calibration_sample(train, args.calibration_blocks, seed=seed, key="--calibration-blocks")
        for shape, (target, methods, notes) in targets.items():
            for label, dr, wr in methods:
                m = copy.deepcopy(teacher)
                t0 = time.time()
                rep = prune_to_shape(m, target, calib, depth_ranking=dr, width_ranking=wr, seed=seed,
                                     pad_id=td.pad_id, batch_size=16)
                row = {"seed": seed, "shape": shape, "ranking": label, "depth_ranking": dr, "width_ranking": wr,
                       "perplexity": ppl(m), "prune_seconds": time.time() - t0,
                       "shape_after": rep.shape_after, "params": rep.params_after,
                       "removed_layers": rep.removed_layers, "layer_scores": rep.layer_scores.get("scores"),
                       "notes": notes}
                if shape == "depth":
                    row["rank_among_layer_subsets"] = 1 + sum(r["perplexity"] < row["perplexity"] for r in subsets)
                rows.append(row)
                print(f"seed {seed} {shape:8s} {label:28s} ppl {row['perplexity']:10.2f}  removed layers "
                      f"{rep.removed_layers}  params {rep.params_after}", flush=True)
    out = {"machine": machine, "loadavg_at_end": os.getloadavg(),
           "command": " ".join(["python", "benchmarks/bench_prune_teacher.py", *(argv or sys.argv[1:])]),
           "config": args.config, "overrides": args.overrides, "calibration_blocks": args.calibration_blocks,
           "teacher": {"perplexity": teacher_ppl, "params": sum(p.numel() for p in teacher.parameters()),
                       "checkpoint_hash": art.config_hash},
           "test_blocks": len(test), "seq_len": cfg.data.seq_len, "total_wall_seconds": time.time() - t_all,
           "depth_layer_subsets": subsets, "depth_expected_random_perplexity": expected_random,
           "rows": rows, "median": {}, "beats_random": {}}
    for shape, (_, methods, _) in targets.items():
        for label, *_ in methods:
            out["median"][f"{shape}/{label}"] = statistics.median(
                r["perplexity"] for r in rows if r["shape"] == shape and r["ranking"] == label)
        for label, *_ in methods[:-1]:  # every importance ranking against the random row, seed by seed
            out["beats_random"][f"{shape}/{label}"] = all(
                beats(pick(rows, s, shape, label), pick(rows, s, shape, "random")) for s in args.seeds)
            if shape == "depth":
                out["beats_random"][f"{shape}/{label}"] &= all(
                    pick(rows, s, shape, label)["perplexity"] < expected_random for s in args.seeds)
    out["target_met"] = all(out["beats_random"].values())
    write_json_atomic(args.out, out)
    print(f"\ndepth: mean perplexity over all {len(subsets)} choices of layers (the expected random choice) "
          f"{expected_random:.2f}; best {min(r['perplexity'] for r in subsets):.2f}")
    print(f"\nteacher (4 x 256) test perplexity {teacher_ppl:.2f}; calibration {args.calibration_blocks} blocks of "
          f"{cfg.data.seq_len} tokens; perplexity right after pruning (median of seeds {args.seeds}):\n")
    print("| shape | ranking | params | median ppl | per seed | beats random on every seed |")
    print("|---|---|---:|---:|---|---|")
    for shape, (_, methods, _) in targets.items():
        for label, *_ in methods:
            rs = [r for r in rows if r["shape"] == shape and r["ranking"] == label]
            print(f"| {shape} | {label} | {rs[0]['params']} | {out['median'][f'{shape}/{label}']:.2f} | "
                  f"{', '.join(format(r['perplexity'], '.1f') for r in rs)} | "
                  f"{out['beats_random'].get(f'{shape}/{label}', '-')} |")
    print(f"\ntarget met (every importance ranking beats random on every seed): {out['target_met']}\n"
          f"results: {args.out}")
    return 0


def pick(rows, seed, shape, ranking) -> dict:
    return next(r for r in rows if r["seed"] == seed and r["shape"] == shape and r["ranking"] == ranking)


def beats(r: dict, random_row: dict) -> bool:
    """Lower perplexity than the seed's random choice; a random draw of the very same layers and channels
    is a tie, which counts (the ranking made the choice a random draw can only match)."""
    same = r["removed_layers"] == random_row["removed_layers"] and r["shape"] == "depth"
    return r["perplexity"] < random_row["perplexity"] or same


def every_layer_subset(teacher, keep: int, ppl) -> list[dict]:
    """Perplexity of the teacher with each choice of layers removed (depth only: C(layers, removed) models)."""
    import copy
    import itertools

    from raydistill.compress.structured_depth import drop_layers

    n = teacher.config.num_hidden_layers
    out = []
    for removed in itertools.combinations(range(n), n - keep):
        m = copy.deepcopy(teacher)
        drop_layers(m, removed)
        out.append({"removed_layers": list(removed), "perplexity": ppl(m)})
    return out


def distillation(args, argv) -> int:
    """Pruned-and-distilled vs random-init distilled students: ``raydistill distill`` runs with
    ``student.init.from: teacher`` (see the module doc)."""
    import json

    from raydistill.config import load_config
    from raydistill.distill import run_distill
    from raydistill.distill.session import ray_session
    from raydistill.distill.teachers import ensure_teacher
    from raydistill.utils import machine_info, write_json_atomic

    machine = machine_info("cpu")
    base = load_config(args.config, args.overrides)
    storage = Path(args.storage_path).expanduser().resolve()
    with ray_session():
        art = ensure_teacher(base, storage)  # trained with run.seed of the config; the same for every seed
    layers = base.student.kwargs["config"]["num_hidden_layers"]
    runs = {"student_shape": ["student.init.from=teacher"],
            "depth_only": ["student.init.from=teacher", f"student.init.num_hidden_layers={layers}"]}
    rows, t_all = [], time.time()
    out = {"machine": machine, "command": " ".join(["python", "benchmarks/bench_prune_teacher.py",
                                                    *(argv or sys.argv[1:])]),
           "config": args.config, "overrides": args.overrides, "calibration_blocks": args.calibration_blocks,
           "teacher": {"checkpoint_hash": art.config_hash, **art.metrics}, "rows": rows}
    for seed in args.seeds:
        row = {"seed": seed}
        for name, extra in runs.items():
            over = [*args.overrides, *extra, "compression.sparsity=0", f"teacher.checkpoint={art.path}",
                    f"run.seed={seed}", f"student.init.seed={seed}",
                    f"student.init.calibration_blocks={args.calibration_blocks}"]
            cfg = load_config(args.config, over)
            run_name = f"prune_teacher_{name}_seed{seed}"
            done = storage / run_name / "report.json"
            t0 = time.time()
            if args.reuse_runs and done.is_file():
                r = json.loads(done.read_text())
            else:
                r = run_distill(cfg, storage_path=storage, name=run_name, progress=False)
            si = r["student_init"]
            row[name] = {
                **{st: {"perplexity": r[st]["perplexity"], "perplexity_ci95": r[st].get("perplexity_ci95"),
                        "params": r[st]["params"], "latency_ms_b1": r[st].get("latency_ms_b1")}
                   for st in ("baseline", "dense_student", "student")},
                "teacher_perplexity": r["teacher"]["metrics"]["perplexity"],
                "pruned_vs_random_init": r["pruned_vs_random_init"],
                "shape": si["shape_after"], "removed_layers": si["removed_layers"],
                "calibration_perplexity_pruned": si["calibration_perplexity_pruned"],
                "overrides": over, "run_dir": r["run_dir"], "wall_seconds": r.get("wall_seconds"),
                "bench_seconds": time.time() - t0, "loadavg": os.getloadavg()}
            print(f"seed {seed} {name}: " + ", ".join(f"{st} {row[name][st]['perplexity']:.2f}"
                                                      for st in ("baseline", "dense_student", "student"))
                  + f" (teacher {row[name]['teacher_perplexity']:.2f})", flush=True)
        ss, d = row["student_shape"], row["depth_only"]
        row["pruned_vs_random_init"] = ss["student"]["perplexity"] / ss["dense_student"]["perplexity"] - 1
        row["depth_only_vs_teacher"] = d["student"]["perplexity"] / d["teacher_perplexity"] - 1
        rows.append(row)
        out.update(loadavg_at_end=os.getloadavg(), total_wall_seconds=time.time() - t_all, targets_met={
            "pruned_10pct_below_random_init": all(r["pruned_vs_random_init"] <= -0.10 for r in rows),
            "depth_only_within_10pct_of_teacher": all(r["depth_only_vs_teacher"] <= 0.10 for r in rows)})
        write_json_atomic(args.out_distill, out)
    print(f"\nteacher test perplexity {art.metrics['perplexity']:.2f}; every student: distill.epochs="
          f"{base.distill.epochs}, batch {base.distill.batch_size}, the same training blocks\n")
    print("| student | seed | baseline (from scratch) | distilled from random init | pruned from the teacher, "
          "distilled | pruned vs random init | pruned vs teacher |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for name in runs:
            e = r[name]
            sh = e["shape"]
            print(f"| {sh['num_hidden_layers']} x {sh['hidden_size']} ({name}) | {r['seed']} | "
                  f"{e['baseline']['perplexity']:.2f} | {e['dense_student']['perplexity']:.2f} | "
                  f"{e['student']['perplexity']:.2f} | "
                  f"{e['student']['perplexity'] / e['dense_student']['perplexity'] - 1:+.1%} | "
                  f"{e['student']['perplexity'] / e['teacher_perplexity'] - 1:+.1%} |")
    print(f"\ntargets: {out['targets_met']}\nresults: {args.out_distill}")
    return 0


def main(argv=None) -> int:
    from raydistill.utils import results_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calibration-blocks", type=int, default=64)
    ap.add_argument("--storage-path", default=str(ROOT / "runs" / "prune_teacher"))
    ap.add_argument("--config", default="lm_default")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(results_dir() / "prune_teacher.json"))
    ap.add_argument("--distill", action="store_true",
                    help="distil the pruned students (raydistill distill runs with student.init.from=teacher) "
                         "instead of measuring pruning alone")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="--distill: read the report.json of a run that already finished instead of running it")
    ap.add_argument("--out-distill", default=str(results_dir() / "prune_teacher_distill.json"))
    args = ap.parse_args(argv)
    if args.calibration_blocks < 1:
        ap.error("--calibration-blocks must be at least 1")
    return distillation(args, argv) if args.distill else pruning_only(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
