"""Real Ray, tiny config: a whole job distilling two teachers' logits and hidden states (a learned projection
from the MLP's 128-wide layers to the CNN's 32 channels) through a worker crash; every term's value in the
epochs log, every teacher in the report, the projections in the train state only (never in the weights
that evaluation and export read)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.ray

# the tiny config's teacher (the first of teachers equals `teacher`, which the file sets) and a small second
TEACHERS = ("teachers={main: {model: cnn1d, kwargs: {channels: 32}, training: {epochs: 15, batch_size: 32, "
            "optimizer: {lr: 0.01}}}, mlp3: {model: mlp, kwargs: {hidden: 64, depth: 3}, "
            "training: {epochs: 3, batch_size: 64, optimizer: {lr: 0.01}}}}")
TERMS = ("distill.terms=[{type: kd_logits, teachers: {main: 1.0, mlp3: 0.5}, temperature: 2.0}, "
         "{type: ce, weight: 0.3}, {type: hidden, teacher: main, weight: 0.05, metric: cosine}, "
         "{type: relation, teacher: mlp3, weight: 0.1}]")


def test_two_teachers_hidden_terms_job_with_a_crash(ray_local, storage, tiny):
    from safetensors.torch import load_file

    from raydistill.distill import run_distill
    from raydistill.distill.checkpointing import load_train_state

    cfg = tiny(TEACHERS, TERMS, "compression.sparsity=0", "distill.epochs=3", "run.debug_crash_at_epoch=2",
               "run.max_failures=1")
    r = run_distill(cfg, storage_path=storage, name="terms", progress=False)
    run = storage / "terms"
    assert set(r["teachers"]) == {"main", "mlp3"} and r["teacher"] == r["teachers"]["main"]
    assert all(t["accuracy"] > 0.2 for t in r["teachers"].values())
    md = (run / "report.md").read_text()
    assert "| teacher:main |" in md and "| teacher:mlp3 |" in md and "hidden (main) x0.05" in md
    assert set(r["student"]["terms"]) == {"kd_logits:main+mlp3", "ce", "hidden:main", "relation:mlp3"}
    assert "the student's last epoch: kd_logits:main+mlp3" in md
    assert r["student"]["accuracy"] > 0.3 and r["baseline"]["accuracy"] > 0.2
    rows = [json.loads(x) for x in (run / "student" / "epochs.jsonl").read_text().splitlines()]
    assert (run / "student" / ".debug_crash_done").is_file() and sorted({m["epoch"] for m in rows}) == [1, 2, 3]
    for m in rows:
        assert set(m["terms"]) == {"kd_logits:main+mlp3", "ce", "hidden:main", "relation:mlp3"}
        assert all(v == v and v >= 0 for v in m["terms"].values())
    ck = sorted(p for p in (run / "student").glob("checkpoint_*") if p.is_dir())[-1]
    state = load_train_state(ck)
    proj = {k: v for k, v in state["criterion"].items() if "projections" in k}
    assert {tuple(v.shape) for v in proj.values()} == {(32, 128)} and len(proj) == 2  # 2 layer pairs
    assert not any("projection" in k for k in load_file(str(ck / "model.safetensors")))
    assert not any("projection" in k for k in load_file(str(run / "student.safetensors")))  # the export
    meta = json.loads((ck / "meta.json").read_text())
    assert set(meta["teachers"]) == {"main", "mlp3"}
