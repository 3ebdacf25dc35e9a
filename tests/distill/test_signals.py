"""Ctrl-C and SIGKILL of a real `raydistill distill` (subprocess in its own process group, tiny config):
Ctrl-C stops the teacher or the student stages with exit 130 and a resume command, and neither leaves a
process of the run behind (checked by PID: the driver's descendants just before the signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tune_configs" / "mnist1d_tiny.yaml"


def _random_teacher(path: Path) -> Path:
    """A cnn1d teacher checkpoint (untrained: these tests only need the student stages to run)."""
    import torch
    from safetensors.torch import save_file

    from raydistill.models import build_model

    torch.manual_seed(0)
    net = build_model({"model": "cnn1d", "kwargs": {"channels": 32}})
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _start(storage: Path, *overrides: str) -> tuple[subprocess.Popen, list[str]]:
    argv = [sys.executable, "-m", "raydistill", "distill", str(TINY), "--storage-path", str(storage),
            "--name", "sig", "--no-progress", "--set", "distill.epochs=60", "--set", "distill.transfer_set.size=500",
            *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True), argv


def _wait_for(p: subprocess.Popen, path_glob: str, root: Path, timeout: float = 400) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        hits = [f for f in root.glob(path_glob) if f.stat().st_size > 0]
        if hits:
            return
        if p.poll() is not None:
            out, err = p.communicate()
            pytest.fail(f"the run ended (rc {p.returncode}) before {path_glob} appeared:\n{err[-3000:]}")
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    pytest.fail(f"{path_glob} did not appear within {timeout} s")


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for q in procs:
        try:
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{q.pid} {q.name()} {' '.join(q.cmdline())[:80]}")
        except psutil.Error:
            continue
    return out


def _wait_gone(procs, timeout: float) -> list[str]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        left = _alive(procs)
        if not left:
            return []
        time.sleep(0.5)
    return _alive(procs)


def _cleanup(p, procs):
    for q in procs:
        try:
            if q.is_running():
                q.kill()
        except psutil.Error:
            pass
    if p.poll() is None:
        p.kill()
        p.wait()


@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_ctrl_c_exits_130_with_the_resume_command_and_leaves_nothing(tmp_path, stage):
    if stage == "teacher":  # a teacher that trains long enough to be interrupted while it trains
        p, argv = _start(tmp_path, "teacher.training.epochs=200")
        pattern = "teachers/*/epochs.jsonl"
    else:
        p, argv = _start(tmp_path, f"teacher.checkpoint={_random_teacher(tmp_path / 't.safetensors')}",
                         "compression.sparsity=0")  # baseline + student, at once (run.concurrent_stages)
        pattern = "sig/*/epochs.jsonl"
    procs: list = []
    try:
        _wait_for(p, pattern, tmp_path)
        procs = _descendants(p.pid)
        assert len(procs) > 3  # Ray's processes
        t0 = time.time()
        os.killpg(p.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the whole process group
        out, err = p.communicate(timeout=60)
        took = time.time() - t0
        assert p.returncode == 130, err[-3000:]
        assert took < 30, took  # seconds, not the rest of the training (60 epochs)
        assert "To resume, run the same command again" in err and "raydistill distill" in err
        assert f"--storage-path {tmp_path}" in err and "--name sig" in err
        assert _wait_gone(procs, 20) == []
        if stage == "student":
            assert "report.json" not in out
    finally:
        _cleanup(p, procs)


def test_sigkill_of_the_driver_leaves_no_ray_process(tmp_path):
    p, _ = _start(tmp_path, f"teacher.checkpoint={_random_teacher(tmp_path / 't.safetensors')}",
                  "compression.sparsity=0")
    procs: list = []
    try:
        _wait_for(p, "sig/*/epochs.jsonl", tmp_path)
        procs = _descendants(p.pid)
        names = " ".join(q.name() for q in procs)
        assert "raylet" in names and len(procs) > 3, names
        os.kill(p.pid, signal.SIGKILL)  # the driver only: its children are orphaned
        p.wait(30)
        left = _wait_gone(procs, 40)
        assert left == [], left
    finally:
        _cleanup(p, procs)
