"""``student.init.from: teacher`` end to end through Ray (tiny LM): the job prunes its trained teacher to the
student's shape, saves it with the run, distils it, and the report compares three students of that shape
(from scratch, distilled from random init, pruned from the teacher and distilled); the exported student is
the pruned shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

TINY = ["student.init.from=teacher", "compression.sparsity=0", "data.max_bytes=20000", "data.val_fraction=0.2",
        "teacher.training.epochs=1", "distill.epochs=1", "data.samples=0"]


def test_student_made_from_the_teacher_end_to_end(ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    from raydistill.config import load_config
    from raydistill.distill import run_distill
    from raydistill.distill.evaluate import checkpoint_meta

    cfg = load_config("lm_tiny", [*TINY, f"run.storage_path={tmp_path}"])
    r = run_distill(cfg, storage_path=tmp_path, name="from_teacher", progress=False)
    run = tmp_path / "from_teacher"
    shape = r["student_init"]["shape_after"]  # lm_tiny's student: 1 layer x 32, 2 heads of 16, intermediate 64
    assert (shape["num_hidden_layers"], shape["hidden_size"], shape["num_attention_heads"],
            shape["intermediate_size"]) == (1, 32, 2, 64)
    assert r["student_init"]["shape_before"]["num_hidden_layers"] == 2 and len(r["student_init"]["removed_layers"]) == 1
    pruned = run / "pruned_student"
    assert json.loads((pruned / "pruning.json").read_text())["shape_after"] == shape

    # three students of one shape; the student started from the pruned weights, the other two from random ones
    params = {s: r[s]["params"] for s in ("baseline", "dense_student", "student")}
    assert len(set(params.values())) == 1 and params["student"] == r["student_init"]["params_after"]
    for s in ("baseline", "dense_student", "student"):
        assert 1 < r[s]["perplexity"] < 1000 and r[s]["latency_ms_b1"] > 0
    models = {s: checkpoint_meta(r[s]["checkpoint"])["model"] for s in ("baseline", "dense_student", "student")}
    assert models["student"] == {"model": "hf", "kwargs": {"pretrained": str(pruned)}}
    assert models["baseline"] == models["dense_student"] == {"model": "hf", "kwargs": {"config": str(pruned / "config.json")}}
    d = r["pruned_vs_random_init"]
    assert d["change"] == pytest.approx(r["student"]["perplexity"] / r["dense_student"]["perplexity"] - 1, rel=1e-6)
    assert d["ci95"][0] <= d["change"] <= d["ci95"][1]
    assert r["verdict"]["distilled_stage"] == "dense_student"  # "did distillation help": random init vs scratch
    md = (run / "report.md").read_text()
    for label in ("baseline (from scratch)", "dense_student (random init)", "student (pruned from the teacher)",
                  "pruned from the teacher vs random init, both distilled"):
        assert label in md, label

    # the export: save_pretrained of the distilled pruned student
    out = Path(r["export"])
    assert out == run / "export" / "student"
    back = AutoModelForCausalLM.from_pretrained(str(out))
    assert (back.config.num_hidden_layers, back.config.hidden_size, back.config.head_dim) == (1, 32, 16)
