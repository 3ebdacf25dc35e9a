"""Issue 12's compression targets on MNIST-1D: the default job with four compression recipes per seed.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_compress_targets.py [--seeds 0 1 2] \
        [--recipes qat8 qat4 structured sparse_int8] [--storage-path runs/compress_targets]

Recipes (each one `raydistill distill` run of the default config with `compression` replaced):

* ``qat8``:       [quantize: {bits: 8, activations: int8, mode: qat, start: dense_student, epochs: 5,
                  lr: 0.001}]  -> student (int8 weights and dynamic int8 activations; runs on torch.ao's
                  fbgemm kernel): QAT fine-tuning of the fp32 distilled dense student (5 epochs, peak lr
                  a tenth of distillation's, cosine), dense_student (fp32) and dense_student_ptq
                  (post-training int8 of the fp32 student)
* ``qat8_scratch``: [quantize: {bits: 8, activations: int8, mode: qat}]: the first recipe, QAT distillation
                  from the initialisation (15 epochs, lr 0.01), for comparison
* ``qat4``:       [quantize: {bits: 4, mode: qat}]  (per-channel scales: 32/64/128 do not divide the
                  first layer's 40 inputs)
* ``structured``: [prune_structured: {ratio: 0.5}]  -> half-width dense student, distilled from the pruned
                  dense student; CPU latency at batch 256 vs the dense student, interleaved blocks
* ``sparse_int8``: [prune: {sparsity: 0.8}, quantize: {bits: 8, mode: qat}]; bytes vs fp32 dense, and
                  the exported ``student.safetensors`` read back (``export``: tensor and file bytes, index
                  layout per layer, bit-exact reload against the evaluation's conversion)

Targets (per seed): int8 QAT within 0.5 points of the fp32 distilled student; 4-bit within 2 points;
structured 50% within 2 points and >= 1.6x faster at batch 256; 80% sparse + int8 within 2 points with
bytes <= 10% of the fp32 dense student. Writes benchmarks/results/compress_targets.json (appending
nothing: the file holds this invocation's seeds and recipes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from raydistill.config import load_config
from raydistill.distill import run_distill

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {
    "qat8": "compression=[{quantize: {bits: 8, activations: int8, mode: qat, start: dense_student, epochs: 5, "
            "lr: 0.001}}]",
    "qat8_scratch": "compression=[{quantize: {bits: 8, activations: int8, mode: qat}}]",
    "qat4": "compression=[{quantize: {bits: 4, mode: qat}}]",
    "structured": "compression=[{prune_structured: {ratio: 0.5}}]",
    "sparse_int8": "compression=[{prune: {sparsity: 0.8, begin_fraction: 0.05, end_fraction: 0.5, frequency: 10}}, "
                   "{quantize: {bits: 8, mode: qat}}]",
}
KEYS = ("accuracy", "macro_recall", "macro_f1", "model_bytes", "latency_ms_b1", "latency_ms_b256",
        "projected_sparse_int8_bytes", "sparsity")


def _load_float(cfg, ck: Path):
    """The float model of a stage checkpoint (structure applied), eval mode."""
    from raydistill.compress.structured import resize_structured
    from raydistill.distill.evaluate import checkpoint_meta
    from raydistill.distill.checkpointing import load_weights
    from raydistill.models import build_model

    meta = checkpoint_meta(ck)
    net = build_model(meta.get("model") or cfg.student)
    if meta.get("structure"):
        resize_structured(net, meta["structure"])
    load_weights(net, ck)
    return net.eval()


@torch.no_grad()
def interleaved_latency(models: dict, in_features: int, batch: int, blocks: int = 7, reps: int = 20) -> dict:
    """Median ms per forward of each model, timed in interleaved blocks (A block, B block, A, B, ...)."""
    x = torch.randn(batch, in_features)
    times = {k: [] for k in models}
    for m in models.values():
        for _ in range(5):
            m(x)
    for _ in range(blocks):
        for k, m in models.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def latency_only(args, argv) -> int:
    torch.set_num_threads(args.latency_only)
    load_before = os.getloadavg()
    rows = []
    from raydistill.compress import quantize

    for seed in args.seeds:
        for recipe, other in (("structured", "structured"), ("qat8", "int8"), ("qat4", "int4")):
            run = Path(args.storage_path) / f"{recipe}_seed{seed}"
            if not (run / "report.json").is_file():
                continue
            cfg = load_config(run / "config.yaml")
            rep = json.loads((run / "report.json").read_text())
            student = _load_float(cfg, Path(rep["student"]["checkpoint"]))
            if recipe != "structured":
                q = cfg.compression.quantize
                quantize(student, q.bits, q.group_size, q.activations)
            models = {"dense": _load_float(cfg, Path(rep["dense_student"]["checkpoint"])), other: student}
            for batch in (1, 256):
                lat = interleaved_latency(models, 40, batch, blocks=9, reps=30)
                rows.append({"seed": seed, "recipe": recipe, "batch": batch, "ms": lat,
                             "speedup": lat["dense"] / lat[other]})
                print(json.dumps(rows[-1]), flush=True)
    out = {"threads": args.latency_only, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "torch": torch.__version__, "cpus": os.cpu_count(),
           "command": " ".join(["benchmarks/bench_compress_targets.py", *(argv or sys.argv[1:])]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


@torch.no_grad()
def exported_bytes(cfg, run: Path) -> dict:
    """The exported student (``<run>/student.safetensors``): its tensors' bytes and the file size (the
    safetensors JSON header on top), the index layout of each int8 sparse layer, and whether
    load_compressed gives the same outputs bit for bit on fresh random inputs."""
    from safetensors import safe_open

    from raydistill.compress import load_compressed
    from raydistill.models import build_model

    path = run / "student.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    from raydistill.distill.steps import finalize_student, storage_nbytes
    from raydistill.distill.evaluate import load_checkpoint_model, load_masks_of

    back = load_compressed(lambda: build_model(cfg.student), path).eval()
    layers = {n: {"index": m.index_format, "nnz": m.nnz, **m.storage_bytes()} for n, m in back.named_modules()
              if type(m).__name__ == "SparseLinearInt8"}
    # the student as the evaluation converts it (float checkpoint -> masks -> int8 sparse / quantized)
    ck = json.loads((run / "report.json").read_text())["student"]["checkpoint"]
    ref = load_checkpoint_model(cfg, ck, convert=False)[0]
    finalize_student(ref, load_masks_of(ck), cfg.compression.quantize.model_dump(mode="json"))
    ref.eval()
    sd, sd_back = ref.state_dict(), back.state_dict()
    x = torch.randn(257, 40)
    return {"tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "model_bytes_in_memory": storage_nbytes(back), "file_bytes": path.stat().st_size,
            "sparse_int8_layers": layers,
            "reload_state_dict_bit_exact": sd.keys() == sd_back.keys() and all(
                sd[k].dtype == sd_back[k].dtype and torch.equal(sd[k], sd_back[k]) for k in sd),
            "reload_outputs_bit_exact": bool(torch.equal(back(x), ref(x)))}


def _row(e: dict) -> dict:
    return {k: e[k] for k in KEYS if k in e}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--storage-path", default=str(ROOT / "runs" / "compress_targets"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress_targets.json"))
    ap.add_argument("--latency-only", type=int, metavar="THREADS", default=None,
                    help="no training: re-time the finished runs' dense vs structured / int8 / int4 students "
                         "(interleaved, batch 1 and 256) with THREADS torch threads; writes --out")
    args = ap.parse_args(argv)
    if args.latency_only is not None:
        return latency_only(args, argv)
    load_before = os.getloadavg()
    rows = []
    for seed in args.seeds:
        for name in args.recipes:
            cfg = load_config(None, [*args.overrides, f"run.seed={seed}", RECIPES[name]])
            t0 = time.time()
            r = run_distill(cfg, storage_path=args.storage_path, name=f"{name}_seed{seed}", progress=False)
            row = {"seed": seed, "recipe": name, "teacher": r["teacher"]["accuracy"],
                   "baseline": r["baseline"]["accuracy"], "dense_student": _row(r["dense_student"]),
                   "student": _row(r["student"]), "wall_seconds": time.time() - t0,
                   "loadavg_after": os.getloadavg()}
            if "dense_student_ptq" in r:
                row["dense_student_ptq"] = _row(r["dense_student_ptq"])
            d, s = r["dense_student"], r["student"]
            row["student_minus_dense_points"] = 100 * (s["accuracy"] - d["accuracy"])
            if name.startswith("qat8"):
                row["ptq_minus_dense_points"] = 100 * (r["dense_student_ptq"]["accuracy"] - d["accuracy"])
            if name == "structured":
                lat = interleaved_latency({"dense": _load_float(cfg, Path(d["checkpoint"])),
                                           "structured": _load_float(cfg, Path(s["checkpoint"]))}, 40, 256)
                row["interleaved_ms_b256"] = lat
                row["speedup_b256"] = lat["dense"] / lat["structured"]
            if name == "sparse_int8":
                b = s.get("projected_sparse_int8_bytes", s["model_bytes"])
                row["bytes_fraction_of_fp32_dense"] = b / d["model_bytes"]
                row["bytes_are_projected"] = "projected_sparse_int8_bytes" in s
                row["export"] = exported_bytes(cfg, Path(args.storage_path) / f"{name}_seed{seed}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    checks = {}
    by = {n: [r for r in rows if r["recipe"] == n] for n in args.recipes}
    if by.get("qat8"):
        checks["int8_qat_within_0.5"] = all(r["student_minus_dense_points"] >= -0.5 for r in by["qat8"])
    if by.get("qat8_scratch"):
        checks["int8_qat_scratch_within_0.5"] = all(r["student_minus_dense_points"] >= -0.5
                                                    for r in by["qat8_scratch"])
    if by.get("qat4"):
        checks["int4_qat_within_2"] = all(r["student_minus_dense_points"] >= -2 for r in by["qat4"])
    if by.get("structured"):
        checks["structured_within_2"] = all(r["student_minus_dense_points"] >= -2 for r in by["structured"])
        checks["structured_speedup_ge_1.6"] = all(r["speedup_b256"] >= 1.6 for r in by["structured"])
    if by.get("sparse_int8"):
        checks["sparse_int8_within_2"] = all(r["student_minus_dense_points"] >= -2 for r in by["sparse_int8"])
        checks["sparse_int8_bytes_le_10pct"] = all(r["bytes_fraction_of_fp32_dense"] <= 0.10
                                                   for r in by["sparse_int8"])
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "python": sys.version.split()[0]},
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "git_commit": commit,
           "command": " ".join(["benchmarks/bench_compress_targets.py", *(argv or sys.argv[1:])]),
           "rows": rows, "checks": checks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("\n| seed | recipe | dense fp32 | student | delta (pts) | PTQ int8 | bytes | ms b1 | ms b256 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, d = r["student"], r["dense_student"]
        ptq = r.get("dense_student_ptq", {}).get("accuracy")
        b = s.get("projected_sparse_int8_bytes", s["model_bytes"])
        print(f"| {r['seed']} | {r['recipe']} | {d['accuracy']:.3f} | {s['accuracy']:.3f} | "
              f"{r['student_minus_dense_points']:+.1f} | {'' if ptq is None else f'{ptq:.3f}'} | {b:,} "
              f"({b / d['model_bytes']:.1%}) | {s['latency_ms_b1']:.3f} | {s['latency_ms_b256']:.3f} |")
    print(json.dumps(checks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
