"""Fast unit tests of the distill building blocks (no Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from raydistill.config import load_config
from raydistill.data import load_mnist1d, load_transfer_set
from raydistill.distill.worker import (
    CKPT_META, classification_metrics, load_masks, load_weights, save_checkpoint_dir,
)
from raydistill.models import build_model, count_params


def test_mnist1d_generates_in_memory_and_caches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.num_train=200", "data.num_test=50"])
    st = np.random.get_state()[1].copy()
    split = load_mnist1d(cfg.data, tmp_path / "cache")
    assert np.array_equal(np.random.get_state()[1], st), "global NumPy RNG must be left untouched"
    assert split.x_train.shape == (180, 40) and split.x_val.shape == (20, 40) and split.x_test.shape == (50, 40)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert set(np.unique(split.y_train)) <= set(range(10))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".pkl"] == []  # no mnist1d pickle in cwd
    assert list((tmp_path / "cache").glob("*.npz"))
    again = load_mnist1d(cfg.data, tmp_path / "cache")
    assert np.array_equal(again.x_test, split.x_test)
    tr = load_transfer_set(cfg.data, cfg.distill.transfer_set.model_copy(update={"size": 30}), tmp_path / "cache")
    assert tr.shape == (30, 40)
    assert not any(np.allclose(tr[0], row) for row in split.x_train)  # another seed, other samples


def test_models_registry_and_import_path():
    cnn = build_model({"model": "cnn1d", "kwargs": {"channels": 8}})
    assert cnn(torch.randn(3, 40)).shape == (3, 10)
    mlp = build_model({"model": "mlp", "kwargs": {"hidden": 16, "depth": 2}})
    assert count_params(mlp) == 40 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    user = build_model({"model": "raydistill.models.mnist1d:GRUClassifier", "kwargs": {"hidden": 8}})
    assert user(torch.randn(2, 40)).shape == (2, 10)
    with pytest.raises(ValueError, match="cannot import module"):
        build_model({"model": "no_such_pkg.mod:f", "kwargs": {}})
    with pytest.raises(ValueError, match="bad kwargs"):
        build_model({"model": "mlp", "kwargs": {"widht": 3}})


def test_checkpoint_dir_roundtrip_and_atomic(tmp_path):
    m = build_model({"model": "mlp", "kwargs": {"hidden": 8, "depth": 1}})
    masks = {"net.0.weight": torch.rand(8, 40) > 0.5}
    d = save_checkpoint_dir(tmp_path / "ck", model=m, meta={"epoch": 3}, state={"epoch": 3}, masks=masks)
    assert json.loads((d / CKPT_META).read_text())["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dir left behind
    m2 = build_model({"model": "mlp", "kwargs": {"hidden": 8, "depth": 1}})
    load_weights(m2, d)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(load_masks(d)["net.0.weight"], masks["net.0.weight"])
    # a failure while writing leaves the previous checkpoint intact and no temp dir
    with pytest.raises(TypeError):
        save_checkpoint_dir(tmp_path / "ck", model=m, meta={"epoch": object.__new__(BadJSON)}, state={})
    assert json.loads((d / CKPT_META).read_text())["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


class BadJSON:
    def __str__(self):
        raise TypeError("not serialisable")


def test_classification_metrics():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(p, y, num_classes=3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    f1 = [2 * 1 / (2 + 1 + 1), 2 * 2 / (4 + 1), 2 * 1 / (2 + 0 + 1)]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))


def test_baseline_gets_the_students_optimizer_budget_grad_clip_included(tmp_path):
    """The from-scratch baseline is the comparison for every distillation target: same epochs, batch,
    optimizer, schedule and gradient clipping as the distilled student; only the teacher keeps its own."""
    from raydistill.distill.stages import stage_spec

    cfg = load_config(None, ["distill.grad_clip=0.5"])
    d = cfg.distill
    common = dict(model={"model": "mlp", "kwargs": {}}, epochs=d.epochs, batch_size=d.batch_size,
                  optimizer=d.optimizer.model_dump(), lr_schedule=d.lr_schedule.model_dump(), progress_dir=tmp_path)
    base = stage_spec(cfg, stage="baseline", kind="ce", **common)
    kd = stage_spec(cfg, stage="dense_student", kind="kd", **common)
    teacher = stage_spec(cfg, stage="teacher", kind="ce", **common)
    assert base.grad_clip == kd.grad_clip == 0.5 and teacher.grad_clip is None
    fields = ("epochs", "batch_size", "optimizer", "lr_schedule", "seed", "steps_per_epoch", "grad_clip")
    assert {f: getattr(base, f) for f in fields} == {f: getattr(kd, f) for f in fields}


def test_an_evaluation_run_builds_each_teacher_once(tmp_path, monkeypatch):
    """Two students evaluated against one teacher with the run's TeacherModels: the teacher is built and
    loaded once, and its per-example results equal those of a teacher built for the call alone; another
    teacher (another checkpoint) is built anew."""
    from types import SimpleNamespace

    from raydistill.distill import checkpointing
    from raydistill.distill.evaluate import TeacherModels, evaluate_checkpoint

    cfg = load_config("mnist1d_tiny", [f"run.storage_path={tmp_path}"])

    def checkpoint(name, section):
        spec = {"model": section.model, "kwargs": dict(section.kwargs)}
        return save_checkpoint_dir(tmp_path / name, model=build_model(spec), meta={"epoch": 1, "model": spec},
                                   state={}), spec

    (t1, tspec), (t2, _) = checkpoint("t1", cfg.teacher), checkpoint("t2", cfg.teacher)
    (s1, _), (s2, _) = checkpoint("s1", cfg.student), checkpoint("s2", cfg.student)
    loads = []
    real = checkpointing.load_weights
    monkeypatch.setattr(checkpointing, "load_weights", lambda net, p: (loads.append(Path(p)), real(net, p))[1])
    run = TeacherModels()
    art = SimpleNamespace(path=t1, model=tspec)
    a = evaluate_checkpoint(cfg, s1, teacher=art, teachers=run, latency=False)
    b = evaluate_checkpoint(cfg, s2, teacher=art, teachers=run, latency=False)
    assert loads.count(Path(t1)) == 1 and len(run) == 1
    alone = evaluate_checkpoint(cfg, s2, teacher=art, latency=False)
    assert loads.count(Path(t1)) == 2  # a call without the run's TeacherModels builds its own
    assert a["_items"]["teacher_correct"] == b["_items"]["teacher_correct"] == alone["_items"]["teacher_correct"]
    evaluate_checkpoint(cfg, s1, teacher=SimpleNamespace(path=t2, model=tspec), teachers=run, latency=False)
    assert loads.count(Path(t2)) == 1 and len(run) == 2
