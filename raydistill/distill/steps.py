"""The compression recipe in the distillation pipeline: what each step does where.

``prune_structured``  driver, before the student stage: the dense distilled student is pruned to
                      ``structured.ratio`` of its hidden units (:func:`structured_init`), saved, and the
                      student stage starts from it (``StageSpec.init_from``, shapes ``StageSpec.structure``)
                      to distil it back (Minitron).
``prune``             worker: today's GradualPruner while distilling; evaluation converts to SparseLinear.
``quantize``          ``mode: qat``: worker swaps Linear for FakeQuantLinear (``StageSpec.qat``) and the
                      evaluation converts to QuantizedLinear (the same numbers); ``mode: ptq``: the
                      evaluation quantizes the distilled float student.

Worker and driver: :func:`build_student` (the one builder of a stage's student: shapes, init weights,
QAT). Worker entry points: :func:`size_metrics`, :func:`final_metrics`.
Driver entry points: :func:`student_extras`, :func:`structured_init`, :func:`finalize_student`,
:func:`measure_latency`, :func:`check_recipe`.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["build_student", "student_extras", "search_extras", "final_metrics", "structured_init", "finalize_student", "measure_latency",
           "size_metrics", "projected_nbytes", "check_recipe", "storage_nbytes"]


def _qat_spec(q) -> dict | None:
    if q is None or q.mode != "qat" or q.bits == 32:
        return None
    return {"bits": q.bits, "group_size": q.group_size, "activations": q.activations, "include": q.include,
            "exclude": q.exclude}


def student_extras(cfg, *, structure: dict | None = None, init_from: str | None = None) -> dict:
    """``StageSpec`` fields of the student stage for the config's recipe (JSON-able; part of its hash)."""
    steps = dict(cfg.compression.steps())
    q = steps.get("quantize")
    return {"qat": _qat_spec(q), "quantize": None if q is None else q.model_dump(mode="json"),
            "structure": structure, "init_from": init_from}


def search_extras(cfg) -> dict:
    """``StageSpec`` fields of a Tune trial's student. A trial has no distilled dense student to prune, so
    ``compression.structured.ratio`` there sets the student's hidden widths (those prune_structured would
    leave) and the trial distils that smaller student from its initialisation: a width search."""
    structure = None
    s = dict(cfg.compression.steps()).get("prune_structured")
    if s is not None:
        from raydistill.compress.prune_shape import prune_structured
        from raydistill.models import build_model

        structure = prune_structured(build_model(cfg.student), s.ratio, include=s.include, exclude=s.exclude,
                                     head_unit=s.head_unit).widths
    return student_extras(cfg, structure=structure)


def build_student(task, model: dict, info: dict, *, structure: dict | None = None, qat: dict | None = None,
                  init_from: str | None = None) -> nn.Module:
    """A stage's student as its ``StageSpec`` describes it (the worker's set-up, the FSDP evaluation copy
    and the driver's checkpoint evaluation all build it here): ``task.build_model``, then the pruned shapes
    (``structure``), the weights it starts from (``init_from``: a fresh start only; a resume loads its
    checkpoint afterwards) and fake quantization for QAT (``qat``)."""
    from raydistill.compress.quantize import prepare_qat
    from raydistill.compress.structured import resize_structured

    net = task.build_model(model, info)
    if structure:
        resize_structured(net, structure)
    if init_from:
        from raydistill.distill.checkpointing import load_weights

        load_weights(net, init_from)
    if qat:
        prepare_qat(net, qat["bits"], qat["group_size"], qat["activations"], include=qat.get("include"),
                    exclude=qat.get("exclude"))
    return net


def structured_init(cfg, dense_checkpoint, out_dir, calibration: torch.Tensor | None) -> tuple[str, dict, dict]:
    """Prune the dense distilled student (``dense_checkpoint``) to ``compression.structured``; write its
    weights to ``out_dir``. Returns (path, widths, report dict)."""
    from raydistill.compress.prune_shape import prune_structured
    from raydistill.distill.checkpointing import load_weights, save_checkpoint_dir
    from raydistill.distill.spec import model_dict
    from raydistill.tasks import get_task

    s = dict(cfg.compression.steps())["prune_structured"]
    meta_file = Path(dense_checkpoint) / "meta.json"
    info = (json.loads(meta_file.read_text()).get("task_info") or {}) if meta_file.is_file() else {}
    # the checkpoint's task_info (a causal LM's vocabulary: the tokenizer's)
    net = get_task(cfg.data.task).build_model(model_dict(cfg.student), info)
    load_weights(net, dense_checkpoint)
    cal = None
    if s.ranking == "activation":
        if calibration is None:
            raise ValueError("compression.structured.ranking 'activation' needs a calibration batch")
        cal = calibration[: s.calibration_size]
    rep = prune_structured(net, s.ratio, cal, include=s.include, exclude=s.exclude, head_unit=s.head_unit)
    path = save_checkpoint_dir(Path(out_dir), model=net, meta={"structure": rep.widths, "source": str(dense_checkpoint),
                                                              "report": rep.to_dict()})
    return str(path), rep.widths, rep.to_dict()


@torch.no_grad()
def finalize_student(model: nn.Module, masks: dict | None, quantize_cfg: dict | None) -> dict:
    """Driver side, on a loaded float checkpoint: masks -> SparseLinear, then quantize (PTQ, or the
    conversion after QAT: the same function). Returns {step: report dict} and sets ``bytes`` entries.

    Pruned layers with an int8 per-row weight-only scheme (bits 8, no group_size, fp32 activations)
    become int8 ``SparseLinearInt8`` (``SparseLinear.quantize(bits=8)``: int8 values, per-row scales,
    and per layer the smaller index: 16-bit column indices or a 1-bit-per-weight row bitmap). Other schemes (int4, groups, int8 activations) have no sparse kernel: pruned
    layers are then quantized densely (zeros stay zeros) and ``projected_sparse_int8_bytes`` gives the
    size of their CSR form at ``bits`` (values, int16 column indices when in_features <= 65536, int32
    row pointers, fp32 row scales)."""
    from raydistill.compress.convert import compress
    from raydistill.compress.quantize import quantize
    from raydistill.ops.sparse import SparseLinear

    out: dict[str, Any] = {}
    q = quantize_cfg if quantize_cfg and quantize_cfg.get("bits", 32) != 32 else None
    sparse_int8 = q is not None and hasattr(SparseLinear, "quantize") and q["bits"] == 8 \
        and q.get("group_size") is None and q.get("activations") is None
    if masks and (q is None or sparse_int8):
        out["prune"] = compress(model, masks=masks).to_dict()
    if q is not None:
        if masks and not sparse_int8:
            out["projected_sparse_int8_bytes"] = projected_nbytes(model, masks, q["bits"], q.get("group_size"))
        rep = quantize(model, q["bits"], q.get("group_size"), q.get("activations"), include=q.get("include"),
                       exclude=q.get("exclude"))
        out["quantize"] = rep.to_dict() | {"mode": q.get("mode", "ptq")}
    return out


def storage_nbytes(model: nn.Module) -> int:
    """Bytes to store the model for inference at real widths: parameters and buffers, QuantizedLinear
    codes + scales, SparseLinear as CSR (values, int32 column indices, row pointers; the transposed
    copy it keeps for the backward pass is not counted), SparseLinearInt8 as its buffers (int8 values,
    uint16 indices or the uint8 row bitmap, int32 row pointers, fp32 scales and bias: what the kernel
    reads and what save_compressed writes)."""
    from raydistill.utils import unwrap_model
    from raydistill.ops.sparse import SparseLinear

    base = unwrap_model(model)
    total = 0
    skip: set[int] = set()
    for mod in base.modules():
        if type(mod) is SparseLinear:
            total += mod.csr_bytes() + (mod.bias.numel() * mod.bias.element_size() if mod.bias is not None else 0)
            skip.update(id(t) for t in mod.state_dict(keep_vars=True).values())
    for t in base.state_dict(keep_vars=True).values():
        if t is not None and id(t) not in skip:
            skip.add(id(t))
            total += t.numel() * t.element_size()
    return total


def projected_nbytes(model: nn.Module, masks: dict | None, bits: int, group_size: int | None = None) -> int:
    """Bytes of the model after the recipe, from a float (possibly masked, fake-quantized) model: masked
    layers as CSR (values at ``bits``; for bits < 32 the smaller of int16 column indices (int32 when
    in_features > 65536) and a 1-bit-per-weight row bitmap, as ``SparseLinear.quantize`` picks, else
    int32 indices; int32 row pointers; one fp32 scale per row), other Linear layers dense at ``bits``
    with their scales; everything else at its dtype."""
    from raydistill.compress.pruner import normalize_name
    from raydistill.utils import unwrap_model
    from raydistill.ops.sparse import bitmap_nbytes

    base = unwrap_model(model)
    masks = {normalize_name(k): v for k, v in (masks or {}).items()}
    total = 0
    counted: set[int] = set()
    for name, mod in base.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        n = normalize_name(name)
        out_f, in_f = mod.weight.shape
        counted.add(id(mod.weight))
        if n in masks:
            nnz = int(masks[n].sum())
            idx = nnz * (2 if (bits < 32 and in_f <= 65536) else 4)
            if bits < 32:  # what SparseLinear.quantize picks: the smaller of indices and a row bitmap
                idx = min(idx, bitmap_nbytes(out_f, in_f))
            total += (nnz * bits + 7) // 8 + idx + (out_f + 1) * 4 + (out_f * 4 if bits < 32 else 0)
        else:
            groups = 1 if group_size is None else in_f // group_size
            total += (out_f * in_f * bits + 7) // 8 + (out_f * groups * 4 if bits < 32 else 0)
    for p in base.parameters():
        if id(p) not in counted:
            counted.add(id(p))
            total += p.numel() * p.element_size()
    return total


def size_metrics(model: nn.Module, spec, masks: dict | None) -> dict:
    """Per-epoch size figures of a training student (worker; ``spec`` its ``StageSpec``): projected bytes
    after the recipe."""
    q = spec.quantize or {}
    bits = int(q.get("bits") or 32)
    return {"model_bytes": projected_nbytes(model, masks, bits, q.get("group_size")), "bits": bits}


def final_metrics(model: nn.Module, spec, masks: dict | None, make_input, batches: tuple[int, ...] = (1, 256)) -> dict:
    """Worker, last epoch: CPU latency (``batches``; ``make_input(batch)``: an input batch, the task's
    ``Task.latency_input``) of a converted copy of the student (masks ->
    SparseLinear, quantize) -- the model that the evaluation stores. Taken while the worker's own training
    (and, in a search, other trials) may still run: ``latency_under_load`` says whether other processes
    took CPU time during the reading (:func:`measure_latency`)."""
    from raydistill.utils import unwrap_model

    net = copy.deepcopy(unwrap_model(model)).cpu()
    q = spec.quantize  # FakeQuantLinear layers (QAT) are converted by quantize like nn.Linear
    finalize_student(net, {k: v.cpu() for k, v in (masks or {}).items()} or None, q)
    return measure_latency(net, make_input, batches, repeats=15)


# a latency reading during which other processes used more than this fraction of the machine's CPU time is
# marked ``latency_under_load``
UNDER_LOAD_CPU_FRACTION = 0.25


def measure_latency(model: nn.Module, make_input, batches: tuple[int, ...] = (1, 256), *,
                    repeats: int = 31, warmup: int = 5) -> dict:
    """CPU latency of one eval forward of the batch ``make_input(B)`` (the task's ``Task.latency_input``: a
    classifier's ``(B, in_features)`` floats, a causal LM's ``(B, seq_len)`` token ids), warm, ``repeats``
    calls per batch size ``B`` of ``batches``: ``latency_ms_b{B}`` (median), ``latency_spread_ms_b{B}`` ([10th, 90th] percentile),
    ``latency_threads``, ``latency_loadavg`` (1/5/15 min), ``latency_other_cpu`` (the fraction of the
    machine's CPU time that other processes used while it was measured, from the system's and this
    process's CPU counters, hypervisor steal included) and ``latency_under_load`` (that fraction above
    ``UNDER_LOAD_CPU_FRACTION``: the reading is the machine's contention, not the model's latency)."""
    import os

    import psutil

    out: dict[str, Any] = {"latency_threads": torch.get_num_threads()}
    own, sys0, w0 = psutil.Process().cpu_times(), psutil.cpu_times(), time.perf_counter()
    for b in batches:
        ts = _forward_times(model, make_input(b), repeats=repeats, warmup=warmup)
        out[f"latency_ms_b{b}"] = 1e3 * float(ts[len(ts) // 2])
        out[f"latency_spread_ms_b{b}"] = [1e3 * float(ts[len(ts) // 10]), 1e3 * float(ts[(9 * len(ts)) // 10])]
    own1, sys1, wall = psutil.Process().cpu_times(), psutil.cpu_times(), time.perf_counter() - w0
    busy = (lambda t: sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal")))
    others = (busy(sys1) - busy(sys0)) - ((own1.user + own1.system) - (own.user + own.system))
    frac = max(0.0, others) / max(wall * (os.cpu_count() or 1), 1e-9)
    out.update(latency_loadavg=[round(x, 2) for x in os.getloadavg()], latency_other_cpu=round(min(frac, 1.0), 3),
               latency_under_load=bool(frac > UNDER_LOAD_CPU_FRACTION))
    return out


@torch.no_grad()
def _forward_times(model: nn.Module, x: torch.Tensor, *, repeats: int, warmup: int) -> list[float]:
    """Sorted wall times (s) of ``repeats`` eval forwards of the batch ``x``, after ``warmup`` calls."""
    was = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(x)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t0)
    finally:
        model.train(was)
    return sorted(ts)


def check_recipe(cfg) -> None:
    """Check the recipe against the student model before any training (ValueError naming the key):
    a group size that does not divide a layer's in_features, a structured ratio that removes every unit."""
    from raydistill.compress.quantize import check_scheme
    from raydistill.compress.prune_shape import prune_structured
    from raydistill.distill.spec import model_dict
    from raydistill.tasks import TASKS, get_task

    steps = dict(cfg.compression.steps())
    if not steps:
        return
    task = get_task(cfg.data.task)
    if "quantize" in steps and not task.supports_quantize:
        ok = [n for n in TASKS if get_task(n).supports_quantize]
        raise ValueError(f"compression.quantize: the 'quantize' step is implemented for data.task "
                         f"{' and '.join(repr(n) for n in ok)} only, not "
                         f"{task.name!r}; remove it (prune and prune_structured work for every task)")
    net = task.build_model(model_dict(cfg.student), task.probe_info())
    s = steps.get("prune_structured")
    if s is not None:
        try:
            prune_structured(net, s.ratio, None, include=s.include, exclude=s.exclude, head_unit=s.head_unit)
        except ValueError as exc:
            raise ValueError(f"compression.structured: {exc}") from None
    q = steps.get("quantize")
    if q is not None:
        from raydistill.compress.pruner import select_linear_layers

        selected = select_linear_layers(net, q.include, q.exclude)
        if not selected:  # quantize() would refuse it after training; say it before
            from raydistill.compress.quantize import check_selection

            try:
                check_selection("quantize", net, selected, q.include, q.exclude, (nn.Linear,))
            except ValueError as exc:
                raise ValueError(f"compression.quantize.{'exclude' if q.exclude else 'include'}: {exc}") from None
        for name, mod in selected.items():
            try:
                check_scheme(q.bits, q.group_size, q.activations, mod.in_features, name)
            except ValueError as exc:
                raise ValueError(f"compression.quantize.group_size: {exc}") from None
