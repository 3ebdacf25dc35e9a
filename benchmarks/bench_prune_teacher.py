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

**Distillation (``--distill``; needs the pipeline's ``student.init: {from: teacher}``).** Per seed, two
``raydistill distill`` runs of the config: the student pruned from the teacher and distilled, and the
same-shape student distilled from random init (the config as shipped: its ``dense_student``); plus depth
only (a 2 x 256 student pruned from the teacher and distilled). Targets: pruned+distilled perplexity >= 10%
below random-init distilled; the depth-only one within 10% of the teacher. Writes
benchmarks/results/prune_teacher_distill.json.
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
    """(teacher model in eval mode, TeacherArtifact, TextData): trains the teacher if it is not cached."""
    from raydistill.distill.checkpointing import load_weights
    from raydistill.distill.session import ray_session
    from raydistill.tasks.causal_lm import text_data
    from raydistill.distill.teachers import ensure_teacher
    from raydistill.models import build_model

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
    """Pruned-and-distilled vs random-init distilled students (needs ``student.init: {from: teacher}``)."""
    from raydistill.config import ConfigError, load_config
    import yaml

    from raydistill.distill import run_distill
    from raydistill.utils import machine_info, write_json_atomic

    machine = machine_info("cpu")
    base = load_config(args.config, args.overrides)
    teacher_shape = {k: base.teacher.kwargs["config"][k] for k in ("hidden_size", "intermediate_size",
                                                                  "num_attention_heads", "num_key_value_heads")}
    depth_only = yaml.safe_dump({**base.student.kwargs["config"], **teacher_shape}, default_flow_style=True,
                                width=1 << 16).strip()
    runs = {"random_init": [], "pruned": ["student.init={from: teacher}"],
            "depth_only_pruned": ["student.init={from: teacher}", f"student.kwargs.config={depth_only}"]}
    rows = []
    t_all = time.time()
    for seed in args.seeds:
        row = {"seed": seed}
        for name, extra in runs.items():
            try:
                cfg = load_config(args.config, [*args.overrides, *extra, f"run.seed={seed}"])
            except ConfigError as exc:
                raise SystemExit(f"--distill needs the pipeline's student.init (from: teacher): {exc}") from None
            r = run_distill(cfg, storage_path=args.storage_path, name=f"prune_teacher_{name}_seed{seed}",
                            progress=False)
            row[name] = {"dense_student": r["dense_student"]["perplexity"], "baseline": r["baseline"]["perplexity"],
                         "teacher": r["teacher"]["metrics"].get("perplexity"), "run_dir": r["run_dir"]}
        row["pruned_vs_random_init"] = row["pruned"]["dense_student"] / row["random_init"]["dense_student"] - 1
        row["depth_only_vs_teacher"] = row["depth_only_pruned"]["dense_student"] / row["pruned"]["teacher"] - 1
        rows.append(row)
        print(row, flush=True)
        write_json_atomic(args.out_distill, {
            "machine": machine, "loadavg_at_end": os.getloadavg(), "rows": rows,
            "command": " ".join(["python", "benchmarks/bench_prune_teacher.py", *(argv or sys.argv[1:])]),
            "total_wall_seconds": time.time() - t_all,
            "targets_met": {"pruned_10pct_below_random_init": all(r["pruned_vs_random_init"] <= -0.10 for r in rows),
                            "depth_only_within_10pct_of_teacher": all(r["depth_only_vs_teacher"] <= 0.10
                                                                      for r in rows)}})
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
                    help="also distil the pruned students (needs student.init: {from: teacher} in the pipeline)")
    ap.add_argument("--out-distill", default=str(results_dir() / "prune_teacher_distill.json"))
    args = ap.parse_args(argv)
    if args.calibration_blocks < 1:
        ap.error("--calibration-blocks must be at least 1")
    rc = pruning_only(args, argv)
    return distillation(args, argv) if args.distill and rc == 0 else rc


if __name__ == "__main__":
    raise SystemExit(main())
