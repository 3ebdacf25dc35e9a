"""Training at scale without Ray (issue 22): gradient accumulation is exact, precision (autocast, loss scaling,
the frozen teacher), the step budget, activation checkpointing, and experiment tracking read back."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from raydistill.distill.accumulation import optimizer_step
from raydistill.distill.budget import plan, steps_for_tokens
from raydistill.distill.precision import Precision, enable_gradient_checkpointing

TINY_LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32,
              "tie_word_embeddings": False}
VOCAB, PAD = 40, 0


def _lm(seed: int, plain: bool = False):
    """A float64 Llama (its attention softmax runs in float32, as transformers writes it), or a plain
    embedding + linear LM that is float64 throughout."""
    from raydistill.models import build_model

    torch.manual_seed(seed)
    if plain:
        return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Tanh(), torch.nn.Linear(16, VOCAB)).double()
    return build_model({"model": "hf", "kwargs": {"config": TINY_LLAMA}}, vocab_size=VOCAB).double()


def _spec(kind: str = "kd", fused: bool = False):
    from raydistill.distill.spec import StageSpec

    terms = ({"type": "kd_logits", "weight": 0.6, "teachers": {"main": 1.0}, "temperature": 2.0,
              "divergence": "forward_kl", "beta": 0.5}, {"type": "ce", "weight": 0.4})
    return StageSpec(stage="s", task="causal_lm", kind=kind, model={}, epochs=1, batch_size=2, optimizer={},
                     lr_schedule={}, seed=0, progress_dir="/tmp", fused_linear=fused,
                     **({"terms": terms} if kind == "kd" else {}),
                     task_info={"vocab_size": VOCAB, "pad_id": PAD, "eos_id": 1})


def _teachers(teacher) -> dict:
    return {"main": teacher} if teacher is not None else {}


def _criterion(task, spec, net, teacher):
    from raydistill.distill.loop import build_criterion

    return build_criterion(task, spec, net, _teachers(teacher))


def _loss(task, net, batch, spec, teacher):
    """The stage's loss as the per-worker loop computes it (the spec's criterion over the task's outputs)."""
    return task.loss(net, batch, spec, _teachers(teacher), _criterion(task, spec, net, teacher))


def _blocks(g, rows=6, seq=12):
    ids = torch.randint(2, VOCAB, (rows, seq), generator=g)
    ids[1, 5:] = PAD  # a padded tail block: micro-batches count different numbers of tokens
    ids[4, 9:] = PAD
    return ids


# plain ce: float64 throughout, so equal to float64 rounding. Llama + kd: transformers' attention softmax and
# the kd_loss kernels compute in float32 whatever the input dtype (DESIGN: kernel rules), so equal to float32
# rounding (the micro-batches' gradients pass through them at another scale)
@pytest.mark.parametrize("kind, plain, fused, tol", [("ce", True, False, 1e-12), ("kd", False, False, 1e-5),
                                                     ("kd", False, True, 1e-5)])
def test_k_micro_batches_give_the_update_of_one_batch_of_k_times_the_size(seeded, kind, plain, fused, tol):
    """float64 models: 3 micro-batches of 2 blocks (different token counts) = one batch of 6 blocks;
    scaling each micro-batch's mean by 1/k instead of by its token count would not be."""
    from raydistill.tasks import get_task

    task, spec = get_task("causal_lm"), _spec(kind, fused)
    teacher = _lm(1).requires_grad_(False)
    ids = _blocks(seeded)
    prec = Precision("fp32", "cpu")
    models = {}
    for k in (1, 3):
        net = _lm(0, plain)
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        groups = [{"input_ids": ids}] if k == 1 else [{"input_ids": ids[i:i + 2]} for i in range(0, 6, 2)]
        loss, n = optimizer_step(net, opt, groups, lambda b: _loss(task, net, b, spec, teacher), prec)
        models[k] = (net, loss, n)
    (big, loss1, n1), (acc, loss3, n3) = models[1], models[3]
    assert n1 == n3 == 6 * 11 - 7 - 3  # next-token targets: 11 per block, minus the pad targets
    assert loss3 == pytest.approx(loss1, rel=tol)
    for (name, p), q in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol * 1e-2, msg=lambda m, name=name: f"{name}: {m}")

    # the naive 1/k scaling differs here (the micro-batches' token counts differ): the weighting is needed
    naive = _lm(0, plain)
    start = {k: v.clone() for k, v in naive.named_parameters()}
    naive.zero_grad()
    for i in range(0, 6, 2):
        (_loss(task, naive, {"input_ids": ids[i:i + 2]}, spec, teacher)[0] / 3).backward()
    d_naive = torch.cat([(-p.grad).flatten() for p in naive.parameters()])
    d_exact = torch.cat([(q.detach() - start[n]).flatten() for n, q in acc.named_parameters()])
    assert (d_naive - d_exact).norm() > 1e-3 * d_exact.norm()


def test_precision_autocast_keeps_float32_master_weights_and_casts_the_frozen_teacher():
    lin = torch.nn.Linear(8, 4)
    bf = Precision("bf16", "cpu")
    with bf.autocast():
        y = lin(torch.randn(3, 8))
    assert y.dtype == torch.bfloat16
    bf.backward(y.float().square().mean())
    assert lin.weight.dtype == lin.weight.grad.dtype == torch.float32
    assert not bf.scaler.is_enabled() and bf.state_dict() is None
    t = bf.frozen(torch.nn.Linear(8, 4))
    assert t.weight.dtype == torch.bfloat16
    fp32 = Precision("fp32", "cpu")
    assert fp32.frozen(torch.nn.Linear(2, 2)).weight.dtype == torch.float32
    with fp32.autocast():
        assert lin(torch.randn(1, 8)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        Precision("fp8", "cpu")


def test_bf16_compute_copy_runs_in_bf16_on_float32_master_weights(seeded):
    """distill.precision bf16: the forward runs on a bf16 copy (its residual stream bf16, where autocast alone
    keeps it float32), the step moves its gradients to the float32 master weights (close to the float32
    gradients), updates below bf16's resolution accumulate in the masters, and the next step's forward
    sees the master weights (after in-place edits such as the pruner's masks)."""
    from raydistill.tasks import get_task

    task, spec = get_task("causal_lm"), _spec("ce")
    ids = _blocks(seeded)
    base = _lm(0).float()
    ref = _lm(0).float()
    prec = Precision("bf16", "cpu")
    compute = prec.compute_model(base)
    assert prec.has_master_weights and compute is not base
    assert {p.dtype for p in compute.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert {b.dtype for b in compute.buffers()} == {b.dtype for b in base.buffers()}  # rotary freqs stay fp32
    with torch.no_grad():  # an edit of the masters between the copy and the first step (a pruner's first masks)
        for net in (base, ref):
            net.model.layers[0].mlp.up_proj.weight[0] = 0.25
    prec.sync()
    assert torch.equal(compute.model.layers[0].mlp.up_proj.weight[0], torch.full((16,), 0.25, dtype=torch.bfloat16))
    seen = {}

    def record(name):
        def hook(module, inputs, out):
            seen[name] = (out[0] if isinstance(out, tuple) else out).dtype
        return hook

    for name, net in (("copy", compute), ("autocast", ref)):
        h = net.model.layers[0].register_forward_hook(record(name))
        with prec.autocast():
            task.loss(net, {"input_ids": ids}, spec, {}, _criterion(task, spec, net, None))
        h.remove()
    assert seen == {"copy": torch.bfloat16, "autocast": torch.float32}

    # the gradient that reaches the master weights: float32, close to the float32 model's own
    ref.zero_grad()
    _loss(task, ref, {"input_ids": ids}, spec, None)[0].backward()
    opt = torch.optim.SGD(prec.optimized_parameters(compute), lr=1e-6)
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], base.parameters()))
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    optimizer_step(compute, opt, [{"input_ids": ids}], lambda b: _loss(task, compute, b, spec, None), prec)
    g = torch.cat([p.grad.flatten() for p in base.parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert g.dtype == torch.float32 and all(p.grad is None for p in compute.parameters())
    assert (g - g_ref).norm() < 0.05 * g_ref.norm()
    # lr 1e-6: every update is far below bf16's resolution, yet the master weights move by exactly lr * grad
    for n, p in base.named_parameters():
        torch.testing.assert_close(p.detach(), start[n] - 1e-6 * p.grad, rtol=0, atol=1e-7)
    # where the step is within float32's resolution and below half of bf16's (relative 1e-6 .. 1e-3), a float32
    # master moves and the bf16 weight it rounds to does not: only master weights keep such updates
    small = {n: ((1e-6 * p.grad).abs() > 1e-6 * start[n].abs()) & ((1e-6 * p.grad).abs() < 1e-3 * start[n].abs())
             for n, p in base.named_parameters()}
    n_small = sum(int(m.sum()) for m in small.values())
    moved = sum(int((p.detach() != start[n])[small[n]].sum()) for n, p in base.named_parameters())
    lost = sum(int((p.detach().bfloat16() == start[n].bfloat16())[small[n]].sum()) for n, p in base.named_parameters())
    assert n_small > 500 and moved == n_small and lost > 0.99 * n_small
    # the compute copy is written from the masters before the next forward, after an in-place edit too
    with torch.no_grad():
        base.lm_head.weight[:3] = 0.0
    prec.sync()
    for p, c in zip(base.parameters(), compute.parameters()):
        assert torch.equal(c, p.detach().to(torch.bfloat16))
    assert not compute.lm_head.weight[:3].any()
    # fp32, or a copy not wanted (QAT, FSDP): the model itself, its own parameters optimized
    for prec2 in (Precision("fp32", "cpu"), Precision("bf16", "cpu")):
        net = _lm(1).float()
        assert prec2.compute_model(net, master_weights=prec2.name == "fp32") is net
        assert not prec2.has_master_weights and prec2.optimized_parameters(net) == list(net.parameters())


def test_fp16_loss_scaler_unscales_exactly_skips_inf_steps_and_round_trips_its_state():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    ref, lin = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    lin.load_state_dict(ref.state_dict())
    fp16 = Precision("fp16", "cpu")
    assert fp16.scaler.is_enabled()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    fp16.backward(lin(x).square().sum())  # scaled by 2^16 ...
    fp16.step(opt, lin.parameters())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref(x).square().sum().backward()
    ref_opt.step()
    assert torch.equal(lin.weight, ref.weight)  # ... and unscaled by a power of two: the same update
    before, scale0 = lin.weight.detach().clone(), fp16.scaler.get_scale()
    opt.zero_grad()
    fp16.backward(lin(x).sum() * float("inf"))
    fp16.step(opt, lin.parameters(), grad_clip=1.0)
    assert torch.equal(lin.weight, before) and fp16.scaler.get_scale() < scale0  # skipped, scale backed off
    again = Precision("fp16", "cpu")
    again.load_state_dict(fp16.state_dict())
    assert again.scaler.get_scale() == fp16.scaler.get_scale()


def test_kd_loss_linear_under_autocast_runs_in_the_autocast_dtype(seeded):
    from raydistill import ops

    h = torch.randn(2, 5, 16, generator=seeded, requires_grad=True)
    w = torch.randn(50, 16, generator=seeded, requires_grad=True)
    ht, wt = torch.randn(2, 5, 24, generator=seeded), torch.randn(50, 24, generator=seeded)
    lab = torch.randint(0, 50, (2, 5), generator=seeded)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.kd_loss_linear(h, w, ht, wt, lab, alpha=0.5, temperature=2.0)
    got.backward()
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    want = ops.kd_loss_linear(hb, wb, ht.bfloat16(), wt.bfloat16(), lab, alpha=0.5, temperature=2.0)
    want.backward()
    assert got.item() == want.item()  # the same bf16 computation
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, wb.grad.float())
    plain = ops.kd_loss_linear(h, w, ht, wt, lab, alpha=0.5, temperature=2.0)  # fp32: differs by bf16 rounding
    assert got.item() != plain.item() and got.item() == pytest.approx(plain.item(), rel=2e-2)


def test_budget_plan_and_token_budget():
    b = plan(None, 22, 19, 2)  # 19 micro-batches per epoch, 2 per step: 9 steps, the 19th dropped
    assert (b.epochs, b.micro_per_epoch, b.steps_per_epoch, b.total_steps) == (3, 18, 9, 22)
    b = plan(4, None, 10, 1)
    assert (b.epochs, b.micro_per_epoch, b.total_steps) == (4, 10, 40)
    assert plan(None, 5, 1, 4).steps_per_epoch == 1  # fewer micro-batches than one step: still one step
    # 4 rows x 2 micro-batches x 2 workers x 64 tokens = 1024 tokens per optimizer step
    assert steps_for_tokens(10_240, batch_size=4, accum=2, workers=2, seq_len=64) == 10
    assert steps_for_tokens(10_241, batch_size=4, accum=2, workers=2, seq_len=64) == 11
    with pytest.raises(ValueError, match="epochs or max_steps"):
        plan(None, None, 10, 1)


def test_gradient_checkpointing_recomputes_without_changing_gradients(seeded):
    from raydistill.models import build_model
    from raydistill.tasks import get_task

    task, spec = get_task("causal_lm"), _spec("kd", True)
    ids = _blocks(seeded)
    teacher = _lm(1).requires_grad_(False)
    grads = []
    for ckpt in (False, True):
        net = _lm(0).train()
        if ckpt:
            enable_gradient_checkpointing(net)
            assert net.is_gradient_checkpointing
        _loss(task, net, {"input_ids": ids}, spec, teacher)[0].backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(build_model({"model": "mlp", "kwargs": {}}))


# ----------------------------------------------------------------------------------------------------
# tracking: the driver follows the stages' jsonl logs; read back with each backend's own reader


def _fake_run(tmp_path: Path) -> tuple[Path, dict]:
    run = tmp_path / "runs" / "job"
    for stage in ("baseline", "student"):
        (run / stage).mkdir(parents=True)
    (run / "report.md").write_text("# raydistill run `job`\n")
    (run / "report.json").write_text("{}")
    (run / "config.yaml").write_text("run: {name: job}\n")
    export = run / "export" / "student"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    return run, {"export": str(export)}


def _append(path: Path, *lines: dict) -> None:
    with open(path, "a") as fh:
        for m in lines:
            fh.write(json.dumps(m) + "\n")


def _feed(tracker, run: Path) -> None:
    """Two epochs of the student (steps 1..4, a resumed attempt repeating step 3) and one of the baseline."""
    st = run / "student"
    _append(st / "steps.jsonl", *({"epoch": 1, "global_step": s, "loss": 4.0 - s, "lr": 0.1 * s} for s in (1, 2)))
    _append(st / "epochs.jsonl", {"epoch": 1, "global_step": 2, "train_loss": 3.5, "perplexity": 30.0, "attempt": 7})
    tracker.poll()  # as the thread does while the job runs
    _append(st / "steps.jsonl", {"epoch": 2, "global_step": 3, "loss": 1.0, "lr": 0.3},
            {"epoch": 2, "global_step": 3, "loss": 99.0, "lr": 0.3},  # a resumed run repeats step 3
            {"epoch": 2, "global_step": 4, "loss": 0.5, "lr": 0.4})
    _append(st / "epochs.jsonl", {"epoch": 2, "global_step": 4, "train_loss": 0.75, "perplexity": 20.0})
    _append(run / "baseline" / "epochs.jsonl", {"epoch": 1, "global_step": 2, "train_loss": 5.0, "perplexity": 40.0})


def test_tracking_mlflow_config_metrics_report_and_student_read_back(tmp_path):
    from mlflow.tracking import MlflowClient

    from raydistill.config import load_config
    from raydistill.distill.tracking import Tracker

    run, report = _fake_run(tmp_path)
    uri = f"file:{tmp_path / 'mlruns'}"
    cfg = load_config("lm_tiny", ["run.tracking=mlflow", f"run.tracking_uri={uri}"])
    with Tracker(cfg, tmp_path / "runs", "job", run) as tr:
        _feed(tr, run)
        tr.finish(report)
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("raydistill").experiment_id])}
    assert set(runs) == {"job", "student", "baseline"}
    parent = runs["job"]
    assert parent.data.params["distill.temperature"] == "2.0" and parent.data.params["run.tracking"] == "mlflow"
    assert parent.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "report.json", "report.md", "student"} <= arts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "student")] == ["student/config.json"]
    sid = runs["student"].info.run_id
    assert runs["student"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    hist = client.get_metric_history(sid, "step/loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    ppl = sorted(client.get_metric_history(sid, "perplexity"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in ppl] == [(2, 30.0), (4, 20.0)]  # x axis: the optimizer step
    assert "attempt" not in runs["student"].data.metrics
    assert [m.value for m in client.get_metric_history(runs["baseline"].info.run_id, "perplexity")] == [40.0]


def test_tracking_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raydistill.config import load_config
    from raydistill.distill.tracking import Tracker

    run, report = _fake_run(tmp_path)
    cfg = load_config("lm_tiny", ["run.tracking=tensorboard"])
    with Tracker(cfg, tmp_path / "runs", "job", run) as tr:
        _feed(tr, run)
        tr.finish(report)
    logdir = tmp_path / "runs" / "job" / "tensorboard"  # the default: <storage>/<name>/tensorboard
    ea = EventAccumulator(str(logdir / "student")).Reload()
    assert [(e.step, e.value) for e in ea.Scalars("step/loss")] == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    assert [(e.step, e.value) for e in ea.Scalars("perplexity")] == [(2, 30.0), (4, 20.0)]
    job = EventAccumulator(str(logdir / "job"), size_guidance={"tensors": 0}).Reload()
    texts = {t: job.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in job.Tags()["tensors"]}
    assert "temperature: 2.0" in texts["config/text_summary"]
    assert texts["report/text_summary"].startswith("# raydistill run")
    assert report["export"] in texts["export/text_summary"]


def test_tracking_background_failure_is_logged_not_swallowed(tmp_path, caplog):
    """A poll of the tracking thread that fails (a server gone) loses its lines: the job's log says so once."""
    import logging
    import time

    from raydistill.config import load_config
    from raydistill.distill.tracking import Tracker

    run, _ = _fake_run(tmp_path)
    cfg = load_config("lm_tiny", ["run.tracking=tensorboard"])
    caplog.set_level(logging.DEBUG, logger="raydistill")
    with Tracker(cfg, tmp_path / "runs", "job", run) as tr:
        def down(*a, **k):
            raise ConnectionError("tracking server went away")

        tr._backend.log = down
        _append(run / "student" / "steps.jsonl", {"epoch": 1, "global_step": 1, "loss": 1.0})
        deadline = time.time() + 30
        while time.time() < deadline and sum("went away" in r.getMessage() for r in caplog.records) < 2:
            _append(run / "student" / "steps.jsonl", {"epoch": 1, "global_step": int(time.time() * 1e3), "loss": 1.0})
            time.sleep(0.2)
        tr._backend.log = lambda *a, **k: None
    hits = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(hits) >= 2, "the thread's failed polls were not logged"
    assert [r.levelno for r in hits][:2] == [logging.WARNING, logging.DEBUG]  # warned once, then quietly
    assert "run.tracking: logging to tensorboard failed (ConnectionError" in hits[0].getMessage()


def test_tracking_default_uris_and_unwritable_store(tmp_path):
    from raydistill.config import ConfigError, load_config
    from raydistill.distill.tracking import check_tracking, tracking_uri

    cfg = load_config("lm_tiny", ["run.tracking=mlflow"])
    assert tracking_uri(cfg, tmp_path, "job") == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri(load_config("lm_tiny"), tmp_path, "job") is None
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for kind, uri in (("mlflow", f"file:{blocker}/mlruns"), ("mlflow", f"sqlite:///{blocker}/m.db"),
                      ("tensorboard", str(blocker / "tb")), ("mlflow", "ftp://host/x"),
                      ("tensorboard", "s3://bucket/tb")):
        bad = load_config("lm_tiny", [f"run.tracking={kind}", f"run.tracking_uri={uri}"])
        with pytest.raises(ConfigError, match="run.tracking_uri"):
            check_tracking(bad, tmp_path, "job")
    with pytest.raises(ConfigError, match="run.tracking is 'none'"):
        check_tracking(load_config("lm_tiny", [f"run.tracking_uri={tmp_path}"]), tmp_path, "job")


def test_progress_counts_steps_of_the_budget_with_tokens_per_s_and_eta(tmp_path, capsys):
    from raydistill.distill.progress import Progress

    d = tmp_path / "student"
    d.mkdir()
    prog = Progress(enabled=True)
    prog._lines = True  # the plain-line display (logs, CI): no terminal here
    prog.add("student", d / "epochs.jsonl", None)  # a step budget: the epochs come from the workers
    _append(d / "steps.jsonl", {"epoch": 1, "global_step": 2, "total_steps": 10, "tokens_per_s": 900.0})
    prog.poll()
    _append(d / "steps.jsonl", {"epoch": 1, "global_step": 4, "total_steps": 10, "tokens_per_s": 1000.0})
    _append(d / "epochs.jsonl", {"epoch": 1, "epochs": 3, "global_step": 4, "total_steps": 10, "train_loss": 2.0,
                                 "val_perplexity": 9.0, "perplexity": 9.5, "sparsity": 0.0, "tokens_per_s": 1234.0,
                                 "peak_memory_mib": 3584.0})
    prog.poll()
    err = capsys.readouterr().err
    assert "[student] epoch 1/3  step 4/10" in err and "1,234 tok/s  peak 3.50 GiB" in err and "eta " in err, err
    eta = float(err.split("eta ")[1].split("s")[0])
    assert eta >= 0
    assert prog._stages["student"]["total"] == 10 and prog._stages["student"]["step"] == 4


def _ddp_rank(rank: int, world: int, init: str, ids: torch.Tensor, out: str) -> None:
    """One DDP worker: its 3 blocks as 3 micro-batches of one block, one optimizer step; rank 0 saves."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raydistill.tasks import get_task

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        net = DistributedDataParallel(_lm(0, plain=True))
        task, spec = get_task("causal_lm"), _spec("ce")
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        mine = ids[rank * 3:(rank + 1) * 3]
        optimizer_step(net, opt, [{"input_ids": mine[i:i + 1]} for i in range(3)],
                       lambda b: _loss(task, net, b, spec, None), Precision("fp32", "cpu"), world=world)
        if rank == 0:
            torch.save({k: v.detach() for k, v in net.module.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def test_accumulation_across_ddp_workers_equals_one_batch_of_all_their_rows(seeded, tmp_path):
    """2 gloo workers x 3 micro-batches of one block (token counts differ within and across workers) = one
    batch of the 6 blocks in one process: the workers' token totals are all-reduced, not assumed equal."""
    import torch.multiprocessing as mp

    from raydistill.tasks import get_task

    ids = _blocks(seeded)
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path / 'pg'}", ids, str(out)), nprocs=2, join=True)
    ref = _lm(0, plain=True)
    task, spec = get_task("causal_lm"), _spec("ce")
    optimizer_step(ref, torch.optim.SGD(ref.parameters(), lr=1.0), [{"input_ids": ids}],
                   lambda b: _loss(task, ref, b, spec, None), Precision("fp32", "cpu"))
    got = torch.load(out)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-14, msg=lambda m, k=k: f"{k}: {m}")


def test_tune_tracking_trial_events_and_search_summary_read_back(tmp_path):
    """``raydistill tune``'s pieces without Ray: Ray's TBX logger writes each trial's results under the
    tracking directory; the search's report files go to an MLflow run named ``search``."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raydistill.config import load_config
    from raydistill.tune.tracking import TrialDirTBX, experiment_name, log_search_summary, tune_callbacks

    cfg = load_config("mnist1d_tiny", ["run.tracking=tensorboard"])
    (cb,) = tune_callbacks(cfg, tmp_path, "s")
    assert isinstance(cb, TrialDirTBX) and cb.logdir == str(tmp_path / "s" / "tensorboard")
    class Trial:  # what the logger reads of a Tune trial (hashable: the logger keys its writers by trial)
        trial_id, evaluated_params = "t_00001", {}

    trial = Trial()
    for ep, acc in ((1, 0.5), (2, 0.7)):
        cb.log_trial_result(ep, trial, {"training_iteration": ep, "epoch": ep, "accuracy": acc})
    cb.log_trial_end(trial)
    ea = EventAccumulator(str(tmp_path / "s" / "tensorboard" / "t_00001")).Reload()
    assert [(e.step, e.value) for e in ea.Scalars("ray/tune/accuracy")] == [(1, 0.5), (2, pytest.approx(0.7))]

    exp = tmp_path / "s"
    (exp / "pareto.json").write_text('{"front": []}')
    (exp / "trials.csv").write_text("trial_id\nt_00001\n")
    uri = f"file:{tmp_path / 'mlruns'}"
    mcfg = load_config("mnist1d_tiny", ["run.tracking=mlflow", f"run.tracking_uri={uri}"])
    log_search_summary(mcfg, tmp_path, "s", exp)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment_name("s")).experiment_id])
    assert [r.info.run_name for r in runs] == ["search"]
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"pareto.json", "trials.csv"}


def test_teacher_pass_of_a_bf16_teacher_keeps_bf16_hidden_states_and_the_loss_matches(seeded):
    """distill.precision bf16: the frozen teacher is bf16, its hidden states are kept in bf16 (half the
    bytes), and the autocast loss on them equals the loss on the teacher run at every step."""
    from raydistill.tasks import get_task

    task, spec = get_task("causal_lm"), _spec("kd", True)
    prec = Precision("bf16", "cpu")
    teacher = prec.frozen(_lm(1).float().requires_grad_(False))
    student = _lm(0).float()
    ids = _blocks(seeded)
    with torch.no_grad(), prec.autocast():
        needs = _criterion(task, spec, student, teacher).needs()
        pre = task.prepare({"input_ids": ids}, spec, _teachers(teacher), needs)
    assert pre["teacher.main.last"].dtype == torch.bfloat16
    with prec.autocast():
        cached = _loss(task, student, pre, spec, teacher)[0]
        online = _loss(task, student, {"input_ids": ids}, spec, teacher)[0]
    assert cached.item() == online.item()


def _local_stage(task, spec, student, teacher, train, steps: int, shard=None):
    """A one-worker ``Stage`` as ``loop.setup`` builds it, without Ray."""
    from raydistill.distill.budget import Budget
    from raydistill.distill.loop import Stage, build_optimizer, build_scheduler

    teachers = _teachers(teacher)
    crit = _criterion(task, spec, student, teacher)
    opt = build_optimizer(student.parameters(), {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0})
    return Stage(spec=spec, task=task, rank=0, world=1, device=torch.device("cpu"), base=student, model=student,
                 teachers=teachers, criterion=crit, train=train, eval={}, shard=shard, steps=steps, opt=opt,
                 sched=build_scheduler(opt, {"name": "constant", "warmup_fraction": 0.0}, 100, 1e-2),
                 precision=Precision("fp32", "cpu"),
                 budget=Budget(epochs=1, micro_per_epoch=steps, steps_per_epoch=steps, total_steps=100))


class _Shard:
    """A streamed shard that holds fewer batches than the epoch plans."""

    def __init__(self, batches):
        self.batches = batches

    def iter_torch_batches(self, **kw):
        return iter(self.batches)


@pytest.mark.parametrize("accum", [1, 2])
def test_epoch_term_values_come_from_its_last_steps_forward_with_no_extra_forward(seeded, tmp_path, accum):
    """The epoch's ``terms`` are each term's value on its last stepped micro-batch as that step computed it
    (weights before the update; the fused kd_logits + ce pair split): equal to ``Criterion.values`` on that
    micro-batch with a copy of the student taken before the step, and no student forward beyond the
    steps'. A streamed shard that ends before the planned last step: one forward after it, on the last
    micro-batch with the updated weights."""
    from raydistill.distill.loop import batches, train_epoch
    from raydistill.tasks import get_task

    task = get_task("causal_lm")
    spec = _spec("kd", fused=True).replace(batch_size=2, grad_accum_steps=accum, progress_dir=str(tmp_path))
    teacher = _lm(1).float().requires_grad_(False)
    student = _lm(0).float()
    ids = _blocks(seeded)
    crit = _criterion(task, spec, student, teacher)
    with torch.no_grad():
        train = task.prepare({"input_ids": ids}, spec, _teachers(teacher), crit.needs())
    st = _local_stage(task, spec, student, teacher, train, steps=accum)  # one optimizer step
    last = list(batches(st, 1))[-1]
    before = copy.deepcopy(student)
    calls = []
    student.register_forward_hook(lambda *a: calls.append(1))
    out = train_epoch(st, 1)
    assert len(calls) == accum
    assert set(out["terms"]) == {"kd_logits:main", "ce"}
    with torch.no_grad():
        ref = st.criterion.values(task.forward(before, last, spec, st.teachers, st.criterion.needs()))
    assert out["terms"] == pytest.approx(ref, rel=1e-6)
    with torch.no_grad():
        after = st.criterion.values(task.forward(student, last, spec, st.teachers, st.criterion.needs()))
    assert out["terms"] != pytest.approx(after, rel=1e-6)  # the update moved them: these are the step's own

    # streamed, the shard ends after one of the epoch's two planned optimizer steps: the fallback forward
    rows = [{"input_ids": ids[i:i + 2]} for i in range(0, 2 * accum, 2)]
    st2 = _local_stage(task, spec, _lm(0).float(), teacher, None, steps=2 * accum, shard=_Shard(rows))
    calls2 = []
    st2.model.register_forward_hook(lambda *a: calls2.append(1))
    out2 = train_epoch(st2, 1)
    assert len(calls2) == accum + 1 and st2.global_step == 1
    with torch.no_grad():
        b = task.prepare({"input_ids": rows[-1]["input_ids"]}, spec, st2.teachers, st2.criterion.needs())
        ref2 = st2.criterion.values(task.forward(st2.model, b, spec, st2.teachers, st2.criterion.needs()))
    assert out2["terms"] == pytest.approx(ref2, rel=1e-6)
