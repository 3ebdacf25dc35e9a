"""Evaluation of a checkpoint on the driver: test metrics, size (pruned layers as ``SparseLinear``,
quantized layers at their widths), latency, and the checkpoint of a finished run.

    evaluate_checkpoint(cfg, checkpoint_path) -> dict
    load_checkpoint_model(cfg, checkpoint_path) -> (model, size report, meta, task, task_info)
"""

from __future__ import annotations

import json
from pathlib import Path

from raydistill.config import Config
from raydistill.distill.data import resolve_storage, task_info
from raydistill.distill.spec import model_dict


def final_checkpoint_dir(result, storage_path: Path, name: str) -> Path:
    """The directory of the run's latest checkpoint (from the Result, else the newest on disk)."""
    ck = getattr(result, "checkpoint", None) if result is not None else None
    if ck is not None and Path(ck.path).is_dir():
        return Path(ck.path)
    cands = sorted((p for p in (Path(storage_path) / name).glob("checkpoint_*") if p.is_dir()),
                   key=lambda p: p.stat().st_mtime)
    if not cands:
        raise RuntimeError(f"run {Path(storage_path) / name} finished without a checkpoint")
    return cands[-1]


def checkpoint_meta(path) -> dict:
    from raydistill.distill.checkpointing import META_FILE as CKPT_META

    return json.loads((Path(path) / CKPT_META).read_text())


def load_checkpoint_model(cfg: Config, checkpoint_path, model: dict | None = None, *, convert: bool = True):
    """The model of a checkpoint (built as its stage built it: resized to its ``structure`` when
    structurally pruned; its pruned layers converted to ``SparseLinear`` when ``convert``), its size
    report, its meta and the task."""
    from raydistill.compress import compress, model_sparsity_report
    from raydistill.distill.checkpointing import load_masks, load_weights
    from raydistill.distill.steps import build_student
    from raydistill.tasks import get_task

    ck = Path(checkpoint_path)
    meta = checkpoint_meta(ck) if (ck / "meta.json").is_file() else {}
    spec = model or meta.get("model") or model_dict(cfg.student)
    task = get_task(cfg.data.task)
    info = meta.get("task_info") or task_info(cfg, resolve_storage(cfg.run.storage_path))
    net = build_student(task, spec, info, structure=meta.get("structure"))
    load_weights(net, ck)
    masks = load_masks(ck) if ck.is_dir() else None
    rep = compress(net, masks=masks) if masks and convert else model_sparsity_report(net, masks=masks)
    return net, rep, meta, task, info


def evaluate_checkpoint(cfg: Config, checkpoint_path, model: dict | None = None, *, teacher=True,
                        samples: bool = True, quantize: dict | None = None, latency: bool = True,
                        export: str | None = None, teachers: TeacherModels | None = None) -> dict:
    """Test metrics and size of a checkpoint, with its pruned layers converted to ``SparseLinear``
    (``raydistill.compress.compress`` with the checkpoint's masks) and, with ``quantize`` (a
    ``compression.quantize`` dict), its Linear layers quantized
    (:func:`raydistill.distill.steps.finalize_student`). The task's test metrics (``Task.test_metrics``:
    classification accuracy, macro F1 / precision / recall; causal LM perplexity, next_token_accuracy,
    teacher_agreement -- against the checkpoint's teacher when ``teacher`` is True, against ``teacher``
    when it is a ``TeacherArtifact`` -- and a few greedy ``samples``; each with its 95% interval and, under
    ``"_items"``, the per-item results that the verdict pairs), ``latency_ms_b{B}``
    (:func:`raydistill.distill.steps.measure_latency` at the task's ``latency_batches``: batch 1 and 256 of a
    classifier, one sequence of ``data.seq_len`` tokens of a causal LM; when ``latency`` and the task times one).
    ``model_bytes`` counts real bit widths (codes, scales, CSR indices). ``export``: also write the
    compressed model there (:func:`raydistill.compress.save_compressed`). ``teachers``: the run's
    :class:`TeacherModels` (the teacher is built once for all the checkpoints it evaluates; None: built for
    this call)."""
    net, rep, meta, task, info = load_checkpoint_model(cfg, checkpoint_path, model, convert=not quantize)
    steps: dict = {}
    if quantize:
        from raydistill.distill.steps import finalize_student

        # rep: params, sparsity, fp32 dense bytes of the float model; then masks -> sparse, quantize
        steps = finalize_student(net, load_masks_of(checkpoint_path), quantize)
    storage = resolve_storage(cfg.run.storage_path)
    teachers = teachers if teachers is not None else TeacherModels()
    out = task.test_metrics(cfg, net, storage, info, teacher=lambda: teachers.get(task, meta, info, teacher),
                            samples=samples)
    for key in (f"{task.throughput_unit}_per_s", "terms"):  # training figures of the checkpoint's last epoch
        if key in (meta.get("metrics") or {}):
            out[key] = meta["metrics"][key]
    out.update(sparsity=float(rep.total_sparsity), compression_ratio=float(rep.compression_ratio),
               params=int(rep.params), nonzero_params=int(rep.nonzero_params),
               dense_bytes=int(rep.dense_bytes), compressed_bytes=int(rep.compressed_bytes),
               sparse_layers=sum(1 for m in net.modules()
                                 if type(m).__name__ in ("SparseLinear", "SparseLinearInt8")),
               epoch=meta.get("epoch"), checkpoint=str(checkpoint_path))
    from raydistill.distill.steps import measure_latency, storage_nbytes

    out["model_bytes"] = storage_nbytes(net)
    if quantize:  # bytes at real widths (codes + scales) instead of the float CSR accounting
        out["compressed_bytes"] = out["model_bytes"]
        out["compression_ratio"] = rep.dense_bytes / out["model_bytes"]
    if "projected_sparse_int8_bytes" in steps:
        out["projected_sparse_int8_bytes"] = steps["projected_sparse_int8_bytes"]
    if steps:
        out["steps"] = steps
    if meta.get("structure"):
        out["structure"] = meta["structure"]
    if export:
        from raydistill.compress.export import save_compressed

        save_compressed(net, export, structure=meta.get("structure"))
        out["export"] = str(export)
    if latency and task.latency_input(info, 1) is not None:
        out.update(measure_latency(net, lambda b: task.latency_input(info, b), task.latency_batches))
    return out


def checkpoint_latency(cfg: Config, checkpoint_path, *, quantize: dict | None = None) -> dict:
    """The CPU latency of a checkpoint's model converted as :func:`evaluate_checkpoint` converts it (masks
    -> SparseLinear, ``quantize``), measured now, warm, with repeats
    (:func:`raydistill.distill.steps.measure_latency`): for readings taken after training has ended."""
    from raydistill.distill.steps import finalize_student, measure_latency

    net, _, _, task, info = load_checkpoint_model(cfg, checkpoint_path, convert=not quantize)
    if quantize:
        finalize_student(net, load_masks_of(checkpoint_path), quantize)
    return measure_latency(net, lambda b: task.latency_input(info, b), task.latency_batches)


def load_masks_of(checkpoint_path) -> dict | None:
    """The pruning masks of a checkpoint directory (None: a weights file or no masks)."""
    from raydistill.distill.checkpointing import load_masks

    ck = Path(checkpoint_path)
    return load_masks(ck) if ck.is_dir() else None


class TeacherModels:
    """The teachers one evaluation run compares its checkpoints with, each built and loaded once: pass one
    to every :func:`evaluate_checkpoint` of the run (the students of a pipeline against the same teacher);
    it lives as long as the run holds it, never across runs or configs."""

    def __init__(self):
        self._nets: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self._nets)

    def get(self, task, meta: dict, info: dict, teacher):
        """The teacher to compare with: True -> the checkpoint's own (its first teacher), a
        TeacherArtifact (anything with .path and .model) -> that one, else None."""
        from raydistill.distill.checkpointing import load_weights

        tref = meta.get("teacher") if teacher is True else \
            {"path": teacher.path, "model": teacher.model} if teacher else None
        if not tref:
            return None
        key = json.dumps([str(tref["path"]), tref["model"], info], sort_keys=True, default=str)
        if key not in self._nets:
            net = task.build_model(tref["model"], info)
            load_weights(net, tref["path"])
            self._nets[key] = net.eval()
        return self._nets[key]
