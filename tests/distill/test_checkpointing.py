"""Checkpoints never execute code on load; damaged checkpoints and Ray snapshots are recovered from."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from raydistill.distill import checkpointing as ck
from raydistill.distill.worker import build_optimizer, build_scheduler, save_checkpoint_dir

PKG = Path(__file__).resolve().parents[2] / "raydistill"


def _trained_state(steps=3):
    from raydistill.compress import GradualPruner

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = build_optimizer(model.parameters(), {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01})
    sched = build_scheduler(opt, {"name": "onecycle", "warmup_fraction": 0.3}, 10, 1e-2)
    pruner = GradualPruner(model, 0.5, end_step=4, frequency=1, exclude="2")
    for s in range(1, steps + 1):
        model(torch.randn(5, 8)).sum().backward()
        opt.step()
        sched.step()
        pruner.step(s)
    state = {"epoch": 2, "global_step": steps, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "pruner": pruner.state_dict()}
    return model, state


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b and type(a) is type(b), (a, b)


def test_train_state_round_trips_without_pickle(tmp_path):
    model, state = _trained_state()
    d = save_checkpoint_dir(tmp_path / "c", model=model, meta={"epoch": 2}, state=state)
    assert not list(d.glob("*.pt")) and (d / ck.STATE_JSON).is_file()
    back = ck.load_train_state(d)
    _assert_same(state, back)  # int param ids, betas tuple, step tensors all come back as they were
    # and the optimizer / scheduler accept it
    opt = build_optimizer(model.parameters(), {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01})
    opt.load_state_dict(back["optimizer"])
    build_scheduler(opt, {"name": "onecycle", "warmup_fraction": 0.3}, 10, 1e-2).load_state_dict(back["scheduler"])


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_train_state_pt_is_refused_and_never_runs(tmp_path):
    model, _ = _trained_state(1)
    d = save_checkpoint_dir(tmp_path / "c", model=model, meta={"epoch": 1}, state={"epoch": 1})
    for name in (ck.STATE_JSON, ck.STATE_TENSORS):
        (d / name).unlink()
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "optimizer": _Payload(marker)}, d / ck.LEGACY_STATE)
    with pytest.raises(ck.CheckpointDamaged, match="weights_only"):
        ck.load_train_state(d)
    assert not marker.exists()
    # the worker's resume path reports it as damaged and falls back to a fresh start, still without running it
    warned = []
    assert ck.restore(d, tmp_path / "none", warn=warned.append) is None
    assert not marker.exists() and "train_state.pt" in warned[0]


def test_no_unsafe_deserialisation_in_the_package():
    """Every torch.load in the package uses weights_only=True; no pickle.load(s) / torch.load without it."""
    bad = []
    for f in PKG.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{f.name}: {m.group(0)}")
        bad += [f"{f.name}: {m.group(0)}" for m in re.finditer(r"pickle\.loads?\(|cloudpickle\.loads?\(", text)]
    assert not bad, bad


def _run_dir_with_checkpoints(root: Path, epochs=(1, 2, 3)) -> list[Path]:
    model, state = _trained_state(1)
    out = []
    for e in epochs:
        d = save_checkpoint_dir(root / f"checkpoint_2026-01-0{e}_00-00-00.000000", model=model,
                                meta={"epoch": e, "config_hash": "h"}, state={**state, "epoch": e})
        out.append(d)
    snap = {"checkpoint_results": [{"checkpoint_dir_name": d.name, "metrics": {"epoch": i + 1}}
                                   for i, d in enumerate(out[-2:], len(out) - 2)],
            "latest_checkpoint_result": {"checkpoint_dir_name": out[-1].name, "metrics": {}}}
    (root / ck.SNAPSHOT).write_text(json.dumps(snap))
    return out


def test_truncated_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    dirs = _run_dir_with_checkpoints(tmp_path)
    f = dirs[-1] / ck.MODEL_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msgs = ck.prepare_run_dir(tmp_path, warn=lambda m: None)
    assert len(msgs) == 1 and dirs[-1].name in msgs[0] and "model.safetensors" in msgs[0]
    assert (tmp_path / ck.SNAPSHOT).is_file()  # the snapshot itself is fine: kept
    warned = []
    got = ck.restore(dirs[-1], tmp_path, warn=warned.append)
    assert got["meta"]["epoch"] == 2 and got["state"]["epoch"] == 2
    assert len(warned) == 1 and str(f) in warned[0]
    # a damaged meta.json or train state is skipped the same way
    (dirs[1] / ck.STATE_JSON).write_text("{trunc")
    got = ck.restore(dirs[-1], tmp_path, warn=warned.append)
    assert got["meta"]["epoch"] == 1 and ck.STATE_JSON in warned[-1]


@pytest.mark.parametrize("damage", ["truncated_snapshot", "deleted_checkpoint"])
def test_bad_ray_snapshot_is_moved_aside_and_disk_checkpoints_used(tmp_path, damage):
    import shutil

    dirs = _run_dir_with_checkpoints(tmp_path)
    snap = tmp_path / ck.SNAPSHOT
    if damage == "truncated_snapshot":
        snap.write_text(snap.read_text()[:40])
        newest = 3
    else:
        shutil.rmtree(dirs[-1])
        newest = 2
    msgs = ck.prepare_run_dir(tmp_path, warn=lambda m: None)
    assert len(msgs) == 1 and ck.SNAPSHOT in msgs[0]
    assert not snap.exists() and len(list(tmp_path.glob(ck.SNAPSHOT + ".bad-*"))) == 1
    got = ck.restore(None, tmp_path)  # Ray starts a fresh run record: no checkpoint from Ray
    assert got["meta"]["epoch"] == newest


def test_fresh_run_dir_has_nothing_to_restore(tmp_path):
    assert ck.prepare_run_dir(tmp_path / "new") == []
    assert ck.restore(None, tmp_path / "new") is None
