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

from raydistill.distill.accumulation import optimizer_step
from raydistill.distill.budget import Budget, DataPosition, plan
from raydistill.distill.precision import Precision, lean_activations
from raydistill.distill.spec import StageSpec
from raydistill.tasks import Task, get_task
from raydistill.tasks.base import shard_arrays
from raydistill.utils import memory_mib

CRASH_MARKER = ".debug_crash_done"
STEPS_LOG = "steps.jsonl"   # rank 0: a line every log_every_steps optimizer steps and at each step checkpoint


@dataclass
class Stage:
    """What a worker holds while it trains a stage."""

    spec: StageSpec
    task: Task
    rank: int
    world: int
    device: torch.device
    base: torch.nn.Module                 # the student, unwrapped (bf16 / fp16: its float32 master weights)
    model: torch.nn.Module                # the student as trained (bf16 / fp16: its compute copy; DDP / FSDP wrapped)
    teachers: dict[str, torch.nn.Module]  # the teachers that run on this worker, by name
    criterion: Any                        # raydistill.losses.Criterion: the stage's weighted loss terms
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
    # issue 22: autocast / loss scaling, the budget in optimizer steps, where in the data the run is
    precision: Precision | None = None
    budget: Budget | None = None
    position: DataPosition = field(default_factory=DataPosition)
    attempt: int = field(default_factory=os.getpid)
    t_fn: float = field(default_factory=time.time)
    timings: dict = field(default_factory=dict)
    memory_start_mib: float | None = None   # the worker's memory when its first step begins (models loaded)

    @property
    def progress_dir(self) -> Path:
        return Path(self.spec.progress_dir)

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The first teacher that runs here (evaluation's teacher agreement), if any."""
        return next(iter(self.teachers.values()), None)


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

    base = student_model(task, spec, resuming=ray.train.get_checkpoint() is not None)  # before the restore
    precision = Precision(spec.precision, device)
    t0 = time.time()
    teachers = {}
    for name, ref in spec.teachers.items():
        t = task.build_model(ref.model, spec.task_info)
        load_weights(t, ref.path)
        teachers[name] = precision.frozen(t.to(device).eval().requires_grad_(False))
    criterion = build_criterion(task, spec, base, teachers)
    teachers = {n: t for n, t in teachers.items() if n in criterion.teacher_names}  # only those a term reads
    resume = restore(spec, base, criterion)
    base, criterion = base.to(device), criterion.to(device)
    lean_activations(base, gradient_checkpointing=spec.gradient_checkpointing)  # before the compute copy
    # bf16 / fp16: the forward runs on a low-precision copy, base keeps the float32 master weights (precision.py)
    compute = precision.compute_model(base, master_weights=not spec.qat
                                      and not (spec.strategy == "fsdp" and world > 1))
    model = wrap_model(compute, spec)

    shard = ray.train.get_dataset_shard("train")
    ev = task.to_tensors(shard_arrays(ray.train.get_dataset_shard("eval"), task.eval_columns()), device)
    train, n_local = None, spec.rows_per_worker
    if spec.materialize:
        with precision.autocast():
            train = task.prepare(task.to_tensors(shard_arrays(shard, task.train_columns(spec.offline)), device),
                                 spec, teachers, criterion.needs())
        n_local = len(next(iter(train.values())))
    if world > 1:
        t = torch.tensor([n_local], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        n_local = int(t.item())
    # the budget in optimizer steps (epochs, or max_steps with the epochs it takes; budget.py)
    budget = plan(spec.epochs, spec.max_steps, int(spec.steps_per_epoch or max(1, n_local // spec.batch_size)),
                  spec.grad_accum_steps)
    spec = spec.replace(epochs=budget.epochs)
    steps, total = budget.micro_per_epoch, budget.total_steps
    opt = build_optimizer(precision.optimized_parameters(model) + list(criterion.parameters()), spec.optimizer,
                          fused=not (spec.strategy == "fsdp" and world > 1))
    sched = build_scheduler(opt, spec.lr_schedule, total, spec.optimizer["lr"])
    pruner = build_pruner(base, spec, total)
    st = Stage(spec=spec, task=task, rank=rank, world=world, device=device, base=base, model=model,
               teachers=teachers, criterion=criterion, train=train, eval=ev, shard=shard, steps=steps, opt=opt,
               sched=sched, pruner=pruner, t_fn=t_fn, precision=precision, budget=budget)
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
        precision.load_state_dict(resume.get("scaler"))
        st.position = DataPosition.from_state(resume.get("position")) or DataPosition()
        if st.position.rng is not None:
            torch.set_rng_state(st.position.rng)
    # setup_seconds: the whole set-up; data_seconds: from the teacher's loading on (shards, and with a
    # teacher the one pass that computes its outputs, CausalLMTask.prepare)
    st.timings = {"setup_seconds": time.time() - st.t_fn, "data_seconds": time.time() - t0}
    st.memory_start_mib = memory_mib(device)["now"]
    return st


def student_model(task: Task, spec: StageSpec, *, resuming: bool):
    """The stage's student (``steps.build_student``: shapes, init weights, QAT), as set-up and the FSDP
    evaluation copy build it."""
    from raydistill.distill.steps import build_student

    return build_student(task, spec.model, spec.task_info, structure=spec.structure, qat=spec.qat,
                         init_from=None if resuming else spec.init_from)


def build_criterion(task: Task, spec: StageSpec, student, teachers: dict):
    """The stage's loss terms over the student and the teachers' hidden-layer layouts."""
    import ray.train

    from raydistill.losses import Criterion

    crit = Criterion(spec.terms, student=task.layout(student),
                     teachers={n: task.layout(t) for n, t in teachers.items()})
    if any(True for _ in crit.parameters()) and spec.strategy == "fsdp" \
            and ray.train.get_context().get_world_size() > 1:
        raise ValueError("loss terms with learned projections (hidden terms between layers of different widths) "
                         "cannot run under scaling.strategy fsdp; use ddp")
    return crit


def restore(spec: StageSpec, model, criterion=None) -> dict | None:
    """Load the latest checkpoint of this run into ``model`` (and the criterion's projections); its training
    state (None: a fresh start)."""
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
    if criterion is not None and state.get("criterion"):
        criterion.load_state_dict(state["criterion"])
    if meta.get("config_hash") != spec.config_hash:
        raise RuntimeError(
            f"stage {spec.stage!r}: the checkpoint in this run directory was written by a different config "
            f"(hash {meta.get('config_hash')} != {spec.config_hash}); use a new run name")
    return state


def wrap_model(base, spec: StageSpec):
    """Several workers: DDP (``ray.train.torch.prepare_model``), or FSDP2 (``fully_shard`` on every block of
    the model's layer lists -- a transformer's decoder layers -- then on the whole model). FSDP in bf16 /
    fp16: its own mixed precision (the sharded parameters are the float32 master weights, gathered in the
    low-precision dtype for the forward and backward, gradients reduced in float32)."""
    import ray.train
    import ray.train.torch

    from raydistill.distill.precision import DTYPES

    if spec.strategy == "fsdp" and ray.train.get_context().get_world_size() > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        low = DTYPES[spec.precision] if not spec.qat else None
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low is not None else None)
        for mod in list(base.modules()):
            if isinstance(mod, torch.nn.ModuleList) and len(mod) > 1:
                for block in mod:
                    if any(True for _ in block.parameters()):
                        fully_shard(block, mp_policy=mp)
        return fully_shard(base, mp_policy=mp)
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


def batches(st: Stage, epoch: int, skip: int = 0):
    """The epoch's micro-batches from the ``skip``-th on (a run resumed mid-epoch skips those it trained)."""
    spec, bs = st.spec, st.spec.batch_size
    if st.train is not None:
        g = torch.Generator().manual_seed(spec.seed * 100003 + epoch * 1009 + st.rank)
        n = len(next(iter(st.train.values())))
        perm = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(st.steps * bs / n))])
        perm = perm.to(st.device)
        for i in range(skip, st.steps):
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
        if count < skip:  # streamed: the skipped batches are read, not prepared (issue 22 wave 2: exact)
            count += 1
            continue
        with st.precision.autocast():
            b = st.task.prepare(st.task.to_tensors({k: v for k, v in b.items() if k in cols}, st.device), spec,
                                st.teachers, st.criterion.needs())
        if not len(next(iter(b.values()))):
            continue
        count += 1
        yield b


def train_epoch(st: Stage, epoch: int) -> dict:
    """One epoch of optimizer steps, each over ``grad_accum_steps`` micro-batches (``accumulation.py``); a
    run resumed from a step checkpoint of this epoch continues with the next micro-batch."""
    st.model.train()
    pos = st.position = st.position if st.position.epoch == epoch else DataPosition(epoch=epoch,
                                                                                   rows=st.position.rows)
    t0 = time.time() - pos.seconds
    k = st.spec.grad_accum_steps
    # each loss term's value on the epoch's last stepped micro-batch (the epoch's metrics), read off that
    # step's own forward: the step planned to be the epoch's last records them into `values`
    values: dict = {}
    record = None  # the micro-batch whose forward records them

    def micro_loss(batch):  # the stage's loss terms on one micro-batch (student forward included)
        return st.task.loss(st.model, batch, st.spec, st.teachers, st.criterion,
                            values=values if batch is record else None)

    group: list[dict] = []
    last = None  # the epoch's last stepped micro-batch: each term's value on it goes to the epoch's metrics
    for i, batch in enumerate(batches(st, epoch, skip=pos.batch), start=pos.batch):
        maybe_crash(st, epoch, i)
        group.append(batch)
        if len(group) < k:
            continue
        if i + k >= st.steps or st.global_step + 1 >= st.budget.total_steps:  # no step follows in this epoch
            record = batch
        loss, n = optimizer_step(st.model, st.opt, group, micro_loss, st.precision, grad_clip=st.spec.grad_clip,
                                 world=st.world, extra_params=list(st.criterion.parameters()))
        last = batch
        group = []
        st.sched.step()
        st.global_step += 1
        if st.pruner is not None:
            st.pruner.step(st.global_step)
        pos.batch, pos.rows = pos.batch + k, pos.rows + k * st.spec.batch_size * st.world
        pos.loss_sum, pos.steps, pos.items = pos.loss_sum + loss, pos.steps + 1, pos.items + n
        pos.seconds = time.time() - t0
        after_step(st, epoch, loss)
        if st.global_step >= st.budget.total_steps:
            break
    terms = {n: float(v) for n, v in values.items()} if last is not None and last is record \
        else term_values(st, last)  # (a streamed shard that ended early: its last step did not record them)
    return {**epoch_train_metrics(st, pos), "terms": terms}


def term_values(st: Stage, batch: dict | None) -> dict[str, float]:
    """Each loss term's value, on its own, on ``batch`` with the current weights (no gradient; for the logs),
    where the epoch's last step did not record them."""
    if batch is None:
        return {}
    st.precision.sync()
    with torch.no_grad(), st.precision.autocast():
        return st.criterion.values(st.task.forward(st.model, batch, st.spec, st.teachers, st.criterion.needs()))


def epoch_train_metrics(st: Stage, pos: DataPosition) -> dict:
    dt = max(pos.seconds, 1e-9)
    return {"train_loss": pos.loss_sum / max(1, pos.steps),
            f"{st.task.throughput_unit}_per_s": pos.items * st.world / dt, "epoch_seconds": pos.seconds,
            "total_steps": st.budget.total_steps, **_memory(st)}


def _memory(st: Stage) -> dict:
    """This worker's memory (MiB; rank 0's goes to the logs): its peak so far (the process's peak resident
    set on CPU, the allocator's peak on CUDA) and what it held when its first step began (models, teachers,
    data loaded; the peak above it is what training itself takes: gradients, optimizer state, activations)."""
    return {"peak_memory_mib": memory_mib(st.device)["peak"], "start_memory_mib": st.memory_start_mib}


def after_step(st: Stage, epoch: int, loss: float) -> None:
    """After optimizer step ``st.global_step``: a line in ``steps.jsonl`` every ``log_every_steps``; every
    ``checkpoint_every_steps`` (unless the epoch ends with this step: its report follows) a Ray Train report
    with a checkpoint that resumes at the next micro-batch; the step-level crash for tests."""
    spec, step = st.spec, st.global_step
    epoch_end = st.position.batch >= st.steps or step >= st.budget.total_steps
    every = spec.checkpoint_every_steps
    ckpt = bool(every) and step % every == 0 and not epoch_end
    if ckpt or step % spec.log_every_steps == 0:
        line = {"epoch": epoch, "stage": spec.stage, "global_step": step, "loss": loss,
                "lr": float(st.opt.param_groups[0]["lr"]), "step_report": True,
                **epoch_train_metrics(st, st.position)}
        if ckpt:
            report(st, epoch, line, position=st.position)
        elif st.rank == 0:
            _append_line(st.progress_dir / STEPS_LOG, dict(line, attempt=st.attempt, time=time.time()))
    maybe_crash_at_step(st)


def maybe_crash_at_step(st: Stage) -> None:
    """Testing (``run.debug_crash_at_step``): rank 0's process exits right after that optimizer step, once,
    when the newest step checkpoint before it is committed (so the resume point is deterministic)."""
    crash = st.spec.debug_crash_at_step
    marker = st.progress_dir / CRASH_MARKER
    if not crash or st.global_step != int(crash) or st.rank != 0 or marker.exists():
        return
    every = st.spec.checkpoint_every_steps or 0
    if every:
        _wait_for_committed(st.progress_dir, st.global_step // every * every, key="global_step")
    marker.write_text(f"worker pid {os.getpid()} exited on purpose after step {st.global_step}\n")
    os._exit(17)


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


def _wait_for_committed(run_dir: Path, epoch: int, timeout: float = 60.0, key: str = "epoch") -> None:
    """Wait until Ray Train has committed a checkpoint whose metrics' ``key`` is at least ``epoch``."""
    if epoch < 1:
        return
    snap = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
            if int((latest.get("metrics") or {}).get(key, 0)) >= epoch:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------------
# evaluate, report


def evaluate(st: Stage, epoch: int, train: dict) -> dict:
    """The epoch's metrics (rank 0 evaluates; the other ranks report only epoch and stage)."""
    metrics: dict[str, Any] = {"epoch": epoch, "stage": st.spec.stage}
    net = gather_unsharded(st)
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


def gather_unsharded(st: Stage):
    """The student rank 0 evaluates and checkpoints: FSDP gathers the full model (every rank takes part)
    into rank 0's unsharded copy, and the optimizer state into ``st.optim_state``."""
    if not _sharded(st):
        return st.base
    model_state, st.optim_state = full_state(st)
    if st.rank != 0:
        return st.base
    if st.unsharded is None:
        st.unsharded = student_model(st.task, st.spec, resuming=True)
    st.unsharded.load_state_dict(model_state)
    return st.unsharded


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


def report(st: Stage, epoch: int, metrics: dict, *, position: DataPosition | None = None) -> None:
    """``ray.train.report`` with a checkpoint from rank 0, then the epoch's line in ``epochs.jsonl``.
    ``position``: a step report in the middle of ``epoch`` (issue 22): its checkpoint counts ``epoch - 1``
    epochs done and resumes at ``position``; its line goes to ``steps.jsonl``."""
    import ray.train

    from raydistill.distill.checkpointing import save_checkpoint_dir

    spec = st.spec
    done = epoch if position is None else epoch - 1
    net = st.base if position is None else gather_unsharded(st)  # (an epoch's evaluate gathered already)
    ckpt, tmp_root = None, None
    if st.rank == 0:
        sharded = _sharded(st)
        pos = dict((position or st.position).state(), rng=torch.get_rng_state())
        state = {"epoch": done, "global_step": st.global_step,
                 "optimizer": st.optim_state if sharded else st.opt.state_dict(),
                 "scheduler": st.sched.state_dict(), "pruner": st.pruner.state_dict() if st.pruner else None,
                 "position": pos, "scaler": st.precision.state_dict(),
                 "criterion": st.criterion.state_dict()}  # projections: trained, never part of the model
        refs = {n: {"path": r.path, "model": r.model} for n, r in spec.teachers.items()}
        meta = {"epoch": done, "global_step": st.global_step, "stage": spec.stage, "task": spec.task,
                "config_hash": spec.config_hash, "model": spec.model, "sparsity": metrics.get("sparsity"),
                "metrics": metrics,
                "teacher": next(iter(refs.values()), None), "teachers": refs, "offline": spec.offline,
                "task_info": spec.task_info, "structure": spec.structure}
        tmp_root = Path(tempfile.mkdtemp(prefix="raydistill-ckpt-"))
        name = f"epoch_{epoch:04d}" if position is None else f"step_{st.global_step:09d}"
        ckdir = save_checkpoint_dir(tmp_root / name, model=st.unsharded if sharded else net,
                                    meta=meta, state=state,
                                    masks=st.pruner.masks if st.pruner else None)
        ckpt = ray.train.Checkpoint.from_directory(str(ckdir))
    t_rep = time.time()
    ray.train.report(metrics, checkpoint=ckpt)
    if st.rank == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)
        metrics = dict(metrics, attempt=st.attempt, wall=time.time() - st.t_fn, time=time.time(),
                       fn_start=st.t_fn, report_seconds=time.time() - t_rep, **st.timings)
        _append_line(st.progress_dir / ("epochs.jsonl" if position is None else STEPS_LOG), metrics)


def _append_line(path: Path, metrics: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(metrics) + "\n")


# ----------------------------------------------------------------------------------------------------
# optimizer and schedule


def build_optimizer(params, opt: dict, fused: bool = True):
    """The stage's optimizer. Adam / AdamW use torch's fused kernel (one pass over each parameter; what
    transformers' Trainer uses by default, several times faster than the multi-tensor one on a CPU) unless
    ``fused`` is False (FSDP's sharded parameters) or torch has no fused kernel for the parameters."""
    if opt["name"] == "sgd":
        return torch.optim.SGD(params, lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
    cls = torch.optim.AdamW if opt["name"] == "adamw" else torch.optim.Adam
    params = list(params)
    if fused and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                     for p in params if isinstance(p, torch.Tensor)):
        try:
            return cls(params, lr=opt["lr"], weight_decay=opt["weight_decay"], fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(params, lr=opt["lr"], weight_decay=opt["weight_decay"])


def build_scheduler(optimizer, sched: dict, total_steps: int, lr: float):
    total_steps = max(1, int(total_steps))
    if sched["name"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                   pct_start=max(1e-3, sched["warmup_fraction"]))
    if sched.get("warmup_steps"):  # cosine / constant with linear warmup (issue 22)
        from raydistill.distill.budget import cosine_with_warmup

        return cosine_with_warmup(optimizer, total_steps, sched["warmup_steps"], cosine=sched["name"] == "cosine")
    if sched["name"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
