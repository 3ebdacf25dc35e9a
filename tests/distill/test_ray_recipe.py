"""One small Ray run of the student stage of a whole recipe: prune_structured (of a dense student) ->
prune -> int8 QAT, then the evaluation's conversion. The teacher and the dense student are local
untrained checkpoints (this checks the wiring, not accuracy; the pipeline's ordering is the same code
path that `raydistill distill` and benchmarks/bench_compress_targets.py run)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.ray


def test_student_stage_runs_the_recipe(ray_local, storage, tiny):
    from raydistill.compress import QuantizedLinear
    from raydistill.distill.steps import structured_init, student_extras
    from raydistill.distill import build_student_trainer, ensure_teacher
    from raydistill.distill.evaluate import evaluate_checkpoint, final_checkpoint_dir
    from raydistill.distill.worker import save_checkpoint_dir
    from raydistill.models import build_model

    root = storage / "recipe"
    torch.manual_seed(0)
    teacher_dir = save_checkpoint_dir(root / "teacher", model=build_model({"model": "cnn1d", "kwargs": {"channels": 32}}),
                                      meta={})
    dense_dir = save_checkpoint_dir(root / "dense", model=build_model({"model": "mlp", "kwargs": {"hidden": 128}}),
                                    meta={})
    cfg = tiny("distill.epochs=2", f"teacher.checkpoint={teacher_dir}",
               "compression=[{prune_structured: {ratio: 0.5}}, "
               "{prune: {sparsity: 0.5, begin_fraction: 0.0, end_fraction: 0.5, frequency: 5}}, "
               "{quantize: {bits: 8, mode: qat}}]")
    teacher = ensure_teacher(cfg, storage)
    init, widths, rep = structured_init(cfg, dense_dir, root / "init", torch.randn(256, 40))
    assert widths == {"net.0": 64, "net.2": 64} and rep["ranking"] == "activation"
    tr = build_student_trainer(cfg, teacher, storage_path=root, name="student",
                               extras=student_extras(cfg, structure=widths, init_from=init))
    result = tr.fit()
    rows = [json.loads(x) for x in (root / "student" / "epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["bits"] == 8 and rows[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert 0 < rows[-1]["macro_recall"] <= 1
    ck = final_checkpoint_dir(result, root, "student")
    ev = evaluate_checkpoint(cfg, ck, quantize=cfg.compression.quantize.model_dump(mode="json"))
    assert ev["structure"] == widths
    assert [x["name"] for x in ev["steps"]["quantize"]["layers"]] == ["net.0", "net.2", "net.4"]
    # pruned layers as int8 SparseLinear (int8 values + the smaller of uint16 columns and a row bitmap of
    # ceil(in / 8) bytes per row, int32 row pointers, fp32 row scales), the others int8 codes + fp32 row
    # scales; fp32 biases (the 40-64-64-10 student)
    from raydistill.distill.worker import load_masks

    masks = load_masks(ck)
    assert masks and set(masks) <= {"net.0", "net.2", "net.4"}
    expect = sum(int(masks[n].sum()) + min(2 * int(masks[n].sum()), o * ((i + 7) // 8)) + (o + 1) * 4 + o * 8
                 if n in masks else o * i + o * 4 + o * 4
                 for n, (o, i) in (("net.0", (64, 40)), ("net.2", (64, 64)), ("net.4", (10, 64))))
    assert ev["model_bytes"] == expect and ev["sparse_layers"] == len(masks)  # as SparseLinearInt8
    assert rows[-1]["model_bytes"] > 0 and rows[-1]["latency_ms_b256"] > 0  # the worker's compression metrics
    assert 0 <= ev["accuracy"] <= 1 and ev["latency_ms_b1"] > 0 and ev["latency_ms_b256"] > 0
    # the weights trained under fake quantization reload and convert: first layer has half the units
    fresh = evaluate_checkpoint(cfg, ck, latency=False)
    assert fresh["params"] == sum(o * i + o for o, i in ((64, 40), (64, 64), (10, 64)))
    assert QuantizedLinear  # imported name used by the conversion above


def test_qat_fine_tuning_starts_from_the_dense_student(ray_local, storage, tiny):
    """quantize start: dense_student: the pipeline runs the student stage after the dense one, from its
    final weights, with the step's epochs and peak lr. With a peak lr of 1e-9 the fine-tuned weights
    stay the dense student's (to ~1e-9 per step), so the converted student is the post-training int8 of
    the dense student, as dense_student_ptq reports it."""
    from raydistill.distill import run_distill
    from raydistill.distill.checkpointing import load_weights
    from raydistill.models import build_model

    cfg = tiny("distill.epochs=2", "compression=[{quantize: {bits: 8, mode: qat, start: dense_student, epochs: 1, "
                                   "lr: 1.0e-9}}]")
    r = run_distill(cfg, storage_path=storage, name="qat_ft", progress=False)
    rows = [json.loads(x) for x in (storage / "qat_ft" / "student" / "epochs.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rows] == [1] and rows[0]["lr"] <= 1e-9 and rows[0]["bits"] == 8
    dense_rows = (storage / "qat_ft" / "dense_student" / "epochs.jsonl").read_text().splitlines()
    assert len(dense_rows) == 2 and json.loads(dense_rows[0])["lr"] > 1e-4  # distill's schedule there
    nets = {}
    for stage in ("dense_student", "student"):
        nets[stage] = build_model(cfg.student)
        load_weights(nets[stage], r[stage]["checkpoint"])
    diff = max((a - b).abs().max().item() for a, b in zip(nets["dense_student"].parameters(),
                                                          nets["student"].parameters()))
    assert 0 < diff < 1e-5  # fine-tuned (it moved), from the dense weights (a fresh init differs by ~0.1)
    assert r["student"]["accuracy"] == pytest.approx(r["dense_student_ptq"]["accuracy"], abs=0.004)
    assert r["student"]["model_bytes"] == r["dense_student_ptq"]["model_bytes"]
