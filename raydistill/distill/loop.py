"""The pieces of the per-worker loop (``worker.train_fn_per_worker``): set up a stage from its
``StageSpec``, train one epoch, evaluate, report. Task-specific work goes through ``raydistill.tasks``.

Every epoch each worker calls ``ray.train.report`` with the epoch's metrics; rank 0 attaches a checkpoint
(safetensors weights + masks, optimizer/scheduler/pruner state, a JSON meta) written atomically. On
(re)start ``ray.train.get_checkpoint()`` restores all of it and training continues at the next epoch.
Rank 0 also appends each epoch's metrics to ``<progress_dir>/epochs.jsonl`` (progress display, tests).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raydistill.distill.spec import StageSpec
from raydistill.tasks import Task, get_task
from raydistill.tasks.base import shard_arrays

CRASH_MARKER = ".debug_crash_done"


@dataclass
class Stage:
    """What a worker holds while it trains a stage."""

    spec: StageSpec
    task: Task
    rank: int
    world: int
    device: torch.device
    base: torch.nn.Module                 # the student, unwrapped
    model: torch.nn.Module                # the student as trained (DDP / FSDP wrapped)
    teacher: torch.nn.Module | None
    train: dict | None                    # materialised shard (None: streamed from the Ray Data shard)
    eval: dict
    shard: Any
    steps: int
    opt: torch.optim.Optimizer
    sched: Any
    pruner: Any = None
    global_step: int = 0
    start_epoch: int = 0
    unsharded: torch.nn.Module | None = None   # FSDP: rank 0's full copy of the student, for eval + checkpoint
    optim_state: dict | None = None            # FSDP: the gathered optimizer state
    attempt: int = field(default_factory=os.getpid)
    t_fn: float = field(default_factory=time.time)
    timings: dict = field(default_factory=dict)

    @property
    def progress_dir(self) -> Path:
        return Path(self.spec.progress_dir)


# ----------------------------------------------------------------------------------------------------
# set up


def setup(spec: StageSpec) -> Stage:
    import ray.train
    import ray.train.torch

    from raydistill.distill.checkpointing import load_weights

    t_fn = time.time()  # the worker's train function starts here (after its imports)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, spec.threads))
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.seed)
    if rank == 0:
        Path(spec.progress_dir).mkdir(parents=True, exist_ok=True)
    task = get_task(spec.task)

    base = task.build_model(spec.model, spec.task_info)
    if spec.structure or spec.init_from or spec.qat:  # compression steps (issue 12), before the restore
        from raydistill.distill.steps import prepare_student

        prepare_student(base, spec, resuming=ray.train.get_checkpoint() is not None)
    resume = restore(spec, base)
    base = base.to(device)
    model = wrap_model(base, spec)

    t0 = time.time()
    teacher = None
    if spec.kind == "kd" and spec.teacher is not None:
        teacher = task.build_model(spec.teacher.model, spec.task_info)
        load_weights(teacher, spec.teacher.path)
        teacher = teacher.to(device).eval().requires_grad_(False)
    shard = ray.train.get_dataset_shard("train")
    ev = task.to_tensors(shard_arrays(ray.train.get_dataset_shard("eval"), task.eval_columns()), device)
    train, n_local = None, spec.rows_per_worker
    if spec.materialize:
        train = task.prepare(task.to_tensors(shard_arrays(shard, task.train_columns(spec.offline)), device),
                             spec, teacher)
        n_local = len(next(iter(train.values())))
    if world > 1:
        t = torch.tensor([n_local], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        n_local = int(t.item())
    steps = int(spec.steps_per_epoch or max(1, n_local // spec.batch_size))

    total = spec.epochs * steps
    opt = build_optimizer(model.parameters(), spec.optimizer)
    sched = build_scheduler(opt, spec.lr_schedule, total, spec.optimizer["lr"])
    pruner = build_pruner(base, spec, total)
    st = Stage(spec=spec, task=task, rank=rank, world=world, device=device, base=base, model=model,
               teacher=teacher, train=train, eval=ev, shard=shard, steps=steps, opt=opt, sched=sched,
               pruner=pruner, t_fn=t_fn)
    if resume is not None:
        if _sharded(st):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, optim_state_dict=resume["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        st.global_step, st.start_epoch = int(resume["global_step"]), int(resume["epoch"])
        if pruner is not None and resume.get("pruner") is not None:
            pruner.load_state_dict(resume["pruner"])
    # setup_seconds: the whole set-up; data_seconds: from the teacher's loading on (shards, and with a
    # teacher the one pass that computes its outputs, CausalLMTask.prepare)
    st.timings = {"setup_seconds": time.time() - st.t_fn, "data_seconds": time.time() - t0}
    return st


def restore(spec: StageSpec, model) -> dict | None:
    """Load the latest checkpoint of this run into ``model``; its training state (None: a fresh start)."""
    import ray.train

    from raydistill.utils import unwrap_model
    from raydistill.distill import checkpointing

    ckpt = ray.train.get_checkpoint()
    # Ray's checkpoint if it reads back whole, else the newest intact one on disk (each damaged one skipped
    # is reported with the file and the reason); None: a fresh start
    restored = checkpointing.restore(ckpt.path if ckpt is not None else None, spec.progress_dir)
    if restored is None:
        return None
    meta, state = restored["meta"], restored["state"]
    unwrap_model(model).load_state_dict(restored["weights"])
    if meta.get("config_hash") != spec.config_hash:
        raise RuntimeError(
            f"stage {spec.stage!r}: the checkpoint in this run directory was written by a different config "
            f"(hash {meta.get('config_hash')} != {spec.config_hash}); use a new run name")
    return state


def wrap_model(base, spec: StageSpec):
    """Several workers: DDP (``ray.train.torch.prepare_model``), or FSDP2 (``fully_shard`` on every block of
    the model's layer lists -- a transformer's decoder layers -- then on the whole model)."""
    import ray.train
    import ray.train.torch

    if spec.strategy == "fsdp" and ray.train.get_context().get_world_size() > 1:
        from torch.distributed.fsdp import fully_shard

        for mod in list(base.modules()):
            if isinstance(mod, torch.nn.ModuleList) and len(mod) > 1:
                for block in mod:
                    if any(True for _ in block.parameters()):
                        fully_shard(block)
        return fully_shard(base)
    return ray.train.torch.prepare_model(base)


def _sharded(st: "Stage") -> bool:
    return st.spec.strategy == "fsdp" and st.world > 1


def full_state(st: "Stage"):
    """FSDP: gather the full model and optimizer state dicts (a collective: every rank calls it); rank 0
    gets them (on CPU), the other ranks empty dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(st.model, options=opts), get_optimizer_state_dict(st.model, st.opt, options=opts)


def build_pruner(base, spec: StageSpec, total_steps: int):
    if spec.sparsity <= 0:
        return None
    from raydistill.compress import GradualPruner
    from raydistill.compress.pruner import select_linear_layers

    comp = spec.compression
    exclude = list(comp.get("exclude") or [])
    if comp.get("keep_output_dense"):
        linears = list(select_linear_layers(base))
        if len(linears) > 1:  # a single-layer model keeps its only layer prunable
            exclude.append(linears[-1])
    begin = int(comp["begin_fraction"] * total_steps)
    return GradualPruner(base, spec.sparsity, method=comp["method"], begin_step=begin,
                         end_step=max(begin, int(comp["end_fraction"] * total_steps)),
                         frequency=int(comp["frequency"]), include=comp.get("include"), exclude=exclude or None,
                         scope=comp["scope"], n=comp["n"], m=comp["m"], block=comp["block"])


# ----------------------------------------------------------------------------------------------------
# train one epoch


def batches(st: Stage, epoch: int):
    spec, bs = st.spec, st.spec.batch_size
    if st.train is not None:
        g = torch.Generator().manual_seed(spec.seed * 100003 + epoch * 1009 + st.rank)
        n = len(next(iter(st.train.values())))
        perm = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(st.steps * bs / n))])
        perm = perm.to(st.device)
        for i in range(st.steps):
            idx = perm[i * bs:(i + 1) * bs]
            yield {k: v[idx] for k, v in st.train.items()}
        return
    cols = st.task.train_columns(spec.offline)
    it = st.shard.iter_torch_batches(batch_size=bs, drop_last=True, device=st.device,
                                     local_shuffle_buffer_size=max(bs * 8, 1024),
                                     local_shuffle_seed=spec.seed + epoch * 7919 + st.rank)
    count = 0
    for b in it:
        if count >= st.steps:
            break
        b = st.task.prepare(st.task.to_tensors({k: v for k, v in b.items() if k in cols}, st.device), spec,
                            st.teacher)
        if not len(next(iter(b.values()))):
            continue
        count += 1
        yield b


def train_epoch(st: Stage, epoch: int) -> dict:
    st.model.train()
    t0 = time.time()
    loss_sum = torch.zeros((), dtype=torch.float64)
    n_batches = n_items = 0
    for i, batch in enumerate(batches(st, epoch)):
        maybe_crash(st, epoch, i)
        loss, n = st.task.loss(st.model, batch, st.spec, st.teacher)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        if st.spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(st.model.parameters(), st.spec.grad_clip)
        st.opt.step()
        st.sched.step()
        st.global_step += 1
        if st.pruner is not None:
            st.pruner.step(st.global_step)
        loss_sum += float(loss.detach())
        n_batches += 1
        n_items += n
    dt = time.time() - t0
    per_s = "tokens_per_s" if st.task.name == "causal_lm" else "samples_per_s"
    return {"train_loss": float(loss_sum) / max(1, n_batches), per_s: n_items * st.world / max(dt, 1e-9),
            "epoch_seconds": dt}


def maybe_crash(st: Stage, epoch: int, step: int) -> None:
    """Testing (``run.debug_crash_at_epoch``): rank 0's process exits mid-way through that epoch, once."""
    crash = st.spec.debug_crash_at_epoch
    marker = st.progress_dir / CRASH_MARKER
    if not crash or epoch != int(crash) or step != st.steps // 2 or st.rank != 0 or marker.exists():
        return
    # report() returns before the controller commits the checkpoint (it polls): crash only once the
    # previous epoch's checkpoint is committed, so "resume from the last checkpoint" is deterministic
    _wait_for_committed(st.progress_dir, epoch - 1)
    marker.write_text(f"worker pid {os.getpid()} exited on purpose at epoch {epoch} step {step}\n")
    os._exit(17)  # a real process death, not an exception


def _wait_for_committed(run_dir: Path, epoch: int, timeout: float = 60.0) -> None:
    if epoch < 1:
        return
    snap = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
            if int((latest.get("metrics") or {}).get("epoch", 0)) >= epoch:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------------
# evaluate, report


def evaluate(st: Stage, epoch: int, train: dict) -> dict:
    """The epoch's metrics (rank 0 evaluates; the other ranks report only epoch and stage)."""
    metrics: dict[str, Any] = {"epoch": epoch, "stage": st.spec.stage}
    net = st.base
    if _sharded(st):  # every rank takes part in the gather; rank 0 evaluates an unsharded copy
        model_state, st.optim_state = full_state(st)
        if st.rank == 0:
            if st.unsharded is None:
                st.unsharded = st.task.build_model(st.spec.model, st.spec.task_info)
            st.unsharded.load_state_dict(model_state)
            net = st.unsharded
    if st.rank != 0:
        return metrics
    from raydistill.compress import model_sparsity_report

    rep = model_sparsity_report(net, masks=st.pruner.masks if st.pruner is not None else None)
    metrics.update(train)
    metrics.update(st.task.evaluate(net, st.eval, teacher=st.teacher, task_info=st.spec.task_info))
    metrics.update(sparsity=float(st.pruner.sparsity()) if st.pruner is not None else 0.0,
                   compression_ratio=float(rep.compression_ratio), params=int(rep.params),
                   nonzero_params=int(rep.nonzero_params), lr=float(st.opt.param_groups[0]["lr"]),
                   epochs=st.spec.epochs, global_step=st.global_step)
    if st.spec.stage != "teacher":
        metrics.update(compression_metrics(st, net, epoch))
    return metrics


def compression_metrics(st: Stage, net, epoch: int) -> dict:
    """Compression steps (issue 12): the student's bytes after its recipe every epoch, and at the last epoch
    the CPU latency of a converted copy (masks -> SparseLinear, quantize) on the task's input batches."""
    from raydistill.distill.steps import final_metrics, size_metrics

    masks = st.pruner.masks if st.pruner is not None else None
    out = size_metrics(net, st.spec, masks)
    info = st.spec.task_info
    if epoch == st.spec.epochs and st.task.latency_input(info, 1) is not None:
        out.update(final_metrics(net, st.spec, masks, lambda b: st.task.latency_input(info, b),
                                 st.task.latency_batches))
    return out


def report(st: Stage, epoch: int, metrics: dict) -> None:
    """``ray.train.report`` with a checkpoint from rank 0, then the epoch's line in ``epochs.jsonl``."""
    import ray.train

    from raydistill.distill.checkpointing import save_checkpoint_dir

    spec = st.spec
    ckpt, tmp_root = None, None
    if st.rank == 0:
        sharded = _sharded(st)
        state = {"epoch": epoch, "global_step": st.global_step,
                 "optimizer": st.optim_state if sharded else st.opt.state_dict(),
                 "scheduler": st.sched.state_dict(), "pruner": st.pruner.state_dict() if st.pruner else None}
        meta = {"epoch": epoch, "stage": spec.stage, "task": spec.task, "config_hash": spec.config_hash,
                "model": spec.model, "sparsity": metrics["sparsity"], "metrics": metrics,
                "teacher": {"path": spec.teacher.path, "model": spec.teacher.model} if spec.teacher else None,
                "offline": spec.offline, "task_info": spec.task_info, "structure": spec.structure}
        tmp_root = Path(tempfile.mkdtemp(prefix="raydistill-ckpt-"))
        ckdir = save_checkpoint_dir(tmp_root / f"epoch_{epoch:04d}", model=st.unsharded if sharded else st.base,
                                    meta=meta, state=state,
                                    masks=st.pruner.masks if st.pruner else None)
        ckpt = ray.train.Checkpoint.from_directory(str(ckdir))
    t_rep = time.time()
    ray.train.report(metrics, checkpoint=ckpt)
    if st.rank == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)
        metrics = dict(metrics, attempt=st.attempt, wall=time.time() - st.t_fn, time=time.time(),
                       fn_start=st.t_fn, report_seconds=time.time() - t_rep, **st.timings)
        with open(st.progress_dir / "epochs.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")


# ----------------------------------------------------------------------------------------------------
# optimizer and schedule


def build_optimizer(params, opt: dict):
    if opt["name"] == "sgd":
        return torch.optim.SGD(params, lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
    cls = torch.optim.AdamW if opt["name"] == "adamw" else torch.optim.Adam
    return cls(params, lr=opt["lr"], weight_decay=opt["weight_decay"])


def build_scheduler(optimizer, sched: dict, total_steps: int, lr: float):
    total_steps = max(1, int(total_steps))
    if sched["name"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                   pct_start=max(1e-3, sched["warmup_fraction"]))
    if sched["name"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
