"""Training at scale through Ray Train (issue 22), on the tiny causal LM: a step budget with warmup + cosine,
gradient accumulation and step checkpoints; a worker killed in the middle of an epoch resumes from the
newest step checkpoint and reproduces the uninterrupted run's loss curve exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray

TINY = ["data.max_bytes=20000", "teacher.training.epochs=2", "data.val_fraction=0.2"]
# 2 micro-batches of 16 per optimizer step, a line in steps.jsonl every step, 3 warmup steps then cosine
SCALE = ["distill.epochs=null", "distill.batch_size=16", "distill.grad_accum_steps=2", "distill.log_every_steps=1",
         "distill.lr_schedule={name: cosine, warmup_steps: 3}", "run.num_to_keep=2"]
EVERY = 4  # a step checkpoint every 4 optimizer steps


def _latest_by(path: Path, key: str) -> dict:
    """The lines of a jsonl log, the latest one for each value of ``key`` (a resumed run repeats some)."""
    out = {}
    for line in path.read_text().splitlines():
        m = json.loads(line)
        out[m[key]] = m
    return dict(sorted(out.items()))


@pytest.mark.parametrize("mode", ["materialised", "streamed_2_workers", "offline_streamed_2_workers"])
def test_step_budget_accumulation_and_mid_epoch_resume_is_exact(ray_local, tmp_path, mode, monkeypatch):
    """``streamed``: two workers (every CPU of the node) stream their shards of the parquet train split
    (``data.materialize: false``, a shuffle buffer); the resumed attempt re-reads the micro-batches it skips,
    in the same order. ``offline``: the same rows come from the teacher's top-k outputs cached in 4 shards,
    read and decoded by Ray Data while the workers train (the corpus's train split is not built)."""
    from ray.data.dataset import MaterializedDataset
    from safetensors.torch import load_file

    from raydistill.config import load_config
    from raydistill.distill import build_student_trainer, ensure_teacher
    from raydistill.distill.loop import CRASH_MARKER, STEPS_LOG
    from raydistill.tasks.causal_lm import CausalLMTask, text_data

    streamed, offline = mode != "materialised", mode.startswith("offline")
    workers = 2 if streamed else 1
    base = [*TINY, *SCALE, f"run.storage_path={tmp_path}", f"distill.checkpoint_every_steps={EVERY}",
            f"scaling.num_workers={workers}", f"data.materialize={str(not streamed).lower()}"]
    teacher = ensure_teacher(load_config("lm_tiny", [*TINY, f"run.storage_path={tmp_path}"]), tmp_path)
    if offline:
        from raydistill.distill.teacher_logits import write_teacher_outputs

        tcfg = load_config("lm_tiny", [*TINY, f"run.storage_path={tmp_path}"])
        cache = write_teacher_outputs(tcfg, storage_path=tmp_path, output=tmp_path / "tl", topk=8, concurrency=1,
                                      shard_rows=-(-text_data(tcfg, tmp_path).train_blocks // 4))
        base += [f"distill.teacher_outputs={cache}", "distill.topk=8"]

        def not_built(*a, **kw):
            raise AssertionError("an offline stage built the corpus's train dataset")

        monkeypatch.setattr(CausalLMTask, "datasets", not_built)
    spe = text_data(load_config("lm_tiny", base + ["distill.max_steps=1"]), tmp_path).train_blocks // workers // 16 // 2
    budget = 2 * spe + spe // 2  # 3 epochs, the last one cut in its middle
    resume_at = (spe // EVERY + 1) * EVERY  # the first step checkpoint inside epoch 2
    crash_at = resume_at + 2
    assert spe < resume_at < crash_at < 2 * spe, spe
    cfg = load_config("lm_tiny", base + [f"distill.max_steps={budget}"])
    trainer = build_student_trainer(cfg, teacher, storage_path=tmp_path / "ft", name="straight")
    assert trainer.train_loop_config["spec"].materialize is not streamed
    assert trainer.train_loop_config["spec"].offline is offline
    # streamed (the offline cache too): read while the workers train, not into the object store before
    assert isinstance(trainer.datasets["train"], MaterializedDataset) is not streamed
    res_a = trainer.fit()
    crash = load_config("lm_tiny", base + [f"distill.max_steps={budget}", f"run.debug_crash_at_step={crash_at}",
                                           "run.max_failures=1"])
    res_b = build_student_trainer(crash, teacher, storage_path=tmp_path / "ft", name="crashed").fit()

    run_a, run_b = tmp_path / "ft" / "straight", tmp_path / "ft" / "crashed"
    assert (run_b / CRASH_MARKER).is_file()  # the worker process really died after step crash_at
    epochs_a, epochs_b = _latest_by(run_a / "epochs.jsonl", "epoch"), _latest_by(run_b / "epochs.jsonl", "epoch")
    steps_a, steps_b = _latest_by(run_a / STEPS_LOG, "global_step"), _latest_by(run_b / STEPS_LOG, "global_step")

    # the budget in optimizer steps: epochs derived from it, the last one stops at the budget
    assert list(steps_a) == list(range(1, budget + 1)) and list(epochs_a) == [1, 2, 3]
    assert [epochs_a[e]["global_step"] for e in (1, 2, 3)] == [spe, 2 * spe, budget]
    assert all(m["total_steps"] == budget for m in epochs_a.values())
    # every line carries the worker's memory: its peak so far, never below what it held at its first step
    mem = [(m["start_memory_mib"], m["peak_memory_mib"]) for m in [*steps_a.values(), *epochs_a.values()]]
    assert all(0 < start <= peak for start, peak in mem), mem
    peaks = [p for _, p in mem[:budget]]  # a peak only grows (the kernel's counters are approximate: 1 MiB)
    assert all(b >= a - 1.0 for a, b in zip(peaks, peaks[1:])), peaks
    lrs = [steps_a[s]["lr"] for s in range(1, budget + 1)]
    peak = cfg.distill.optimizer.lr
    assert lrs[:3] == pytest.approx([peak / 3, 2 * peak / 3, peak])  # linear warmup over 3 steps ...
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # ... cosine to 0

    # the crash after step crash_at: the next attempt resumed from the step checkpoint at resume_at (in the
    # middle of epoch 2) and trained the steps after it again
    att_b = {s: m["attempt"] for s, m in steps_b.items()}
    assert att_b[1] == att_b[resume_at] != att_b[resume_at + 1] == att_b[budget]
    assert epochs_b[1]["attempt"] != epochs_b[2]["attempt"]
    # ... and reproduced the uninterrupted run exactly: every step's loss and lr, every epoch's metrics
    assert {s: (m["loss"], m["lr"]) for s, m in steps_b.items()} == {s: (m["loss"], m["lr"]) for s, m in steps_a.items()}
    for e in (1, 2, 3):
        for key in ("train_loss", "val_perplexity", "perplexity", "sparsity", "global_step"):
            assert epochs_b[e][key] == epochs_a[e][key], (e, key)
    wa = load_file(str(Path(res_a.checkpoint.path) / "model.safetensors"))
    wb = load_file(str(Path(res_b.checkpoint.path) / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_with_activation_checkpointing_trains_and_keeps_float32_weights(ray_local, tmp_path):
    """precision bf16 (autocast student and teacher, the frozen teacher cast to bf16, the teacher pass under
    autocast) with activation checkpointing, through Ray: the student learns, its checkpoint is float32,
    and its perplexity is close to the same run in fp32."""
    from safetensors.torch import load_file

    from raydistill.config import load_config
    from raydistill.distill import build_student_trainer, ensure_teacher

    base = [*TINY, f"run.storage_path={tmp_path}", "distill.epochs=2", "compression.sparsity=0"]
    teacher = ensure_teacher(load_config("lm_tiny", base), tmp_path)
    rows = {}
    for prec in ("fp32", "bf16"):
        cfg = load_config("lm_tiny", base + [f"distill.precision={prec}", "distill.gradient_checkpointing=true"])
        res = build_student_trainer(cfg, teacher, storage_path=tmp_path / "ft", name=prec).fit()
        rows[prec] = _latest_by(tmp_path / "ft" / prec / "epochs.jsonl", "epoch")
        weights = load_file(str(Path(res.checkpoint.path) / "model.safetensors"))
        assert {w.dtype for w in weights.values()} == {torch.float32}  # the master weights
    b, f = rows["bf16"], rows["fp32"]
    assert b[2]["val_perplexity"] < b[1]["val_perplexity"] < 384  # learning, far below uniform
    assert b[2]["train_loss"] != f[2]["train_loss"]  # bf16 really ran ...
    assert b[2]["val_perplexity"] == pytest.approx(f[2]["val_perplexity"], rel=0.05)  # ... and stays close
