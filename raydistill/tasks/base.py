"""The task interface: everything the generic code (the per-worker loop, the driver's stages, evaluation,
the report, the Tune search) asks of a task by name, so that none of it branches on which task it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydistill.losses.outputs import Needs, Outputs, StepOutputs
from raydistill.losses.terms import Layout

IGNORE_INDEX = -100


class Task:
    """One task (classification, causal LM).

    Worker: ``build_model`` (student and teachers), ``prepare`` (on the worker's materialised shard, or
    on every streamed batch: the teachers' outputs that are worth keeping), ``forward`` per step (the
    outputs the criterion's terms need, ``StepOutputs``), ``evaluate`` on rank 0 after every epoch.
    Driver: ``task_info``, ``datasets``, ``train_rows``, ``calibration_inputs``, ``test_metrics``; the
    report and the search read the class attributes."""

    name: str = ""
    metric: str = ""              # the headline test metric in reports and searches
    higher_is_better: bool = True
    metric_label: str = ""        # its axis label
    metric_fmt: str = ".4f"
    baseline_key: str = ""        # report key of the distilled student against the baseline (compare())
    throughput_unit: str = "samples"   # train metrics report <unit>_per_s
    reported_metrics: tuple[str, ...] = ()   # per-epoch metrics only this task reports
    report_columns: tuple[tuple[str, str, str], ...] = ()   # (header, metric key, "{:format}") of report tables
    compare_text = "{:+.1f}"      # how 100 * compare(new, ref) reads in the report
    float_columns: tuple[str, ...] = ()
    uses_transfer_set: bool = False    # distillation rows include distill.transfer_set
    supports_quantize: bool = False    # compression.quantize is implemented for it
    exports_pretrained: bool = False   # the student exports with save_pretrained (raydistill.distill.export)
    max_topk: int | None = None        # the most logits `raydistill teacher-logits` can keep per row
    teacher_batch_rows: int = 256      # input rows per teacher forward in `raydistill teacher-logits`
    latency_batches: tuple[int, ...] = (1,)   # batch sizes the CPU latency is measured at (latency_input)

    # -- driver: data and evaluation ------------------------------------------------------------------
    def task_info(self, cfg, storage: Path) -> dict:
        """What models and batches of this task need to know about the data (vocabulary, ...)."""
        return {}

    def check_data(self, cfg) -> None:
        """Before Ray starts: the task's data as the config names it (``ConfigError`` naming the key)."""

    def probe_info(self) -> dict:
        """A ``task_info`` for building models before any data exists (config checks)."""
        return {}

    def datasets(self, cfg, storage: Path, *, transfer: bool) -> tuple[dict, int]:
        """Ray datasets ``{"train": ..., "eval": ...}`` (eval's ``split`` column: 0 val, 1 test) and the train
        rows; ``transfer``: the distillation rows (with the transfer set, where the task has one)."""
        raise NotImplementedError

    def eval_dataset(self, cfg, storage: Path):
        """``datasets(...)["eval"]`` without the train rows (a stage whose train rows come from elsewhere:
        an offline teacher's cache)."""
        raise NotImplementedError

    def train_rows(self, cfg, storage: Path, *, transfer: bool) -> int:
        """The rows of ``datasets(...)["train"]`` without building it."""
        raise NotImplementedError

    def calibration_inputs(self, cfg, storage: Path) -> torch.Tensor:
        """Training inputs for activation statistics (structured pruning's ranking)."""
        raise NotImplementedError

    def test_metrics(self, cfg, model, storage: Path, info: dict, *, teacher=None, samples: bool = True) -> dict:
        """The test split's metrics of a (converted) model on the driver."""
        raise NotImplementedError

    def latency_input(self, info: dict, batch: int) -> torch.Tensor | None:
        """A batch of inputs to time the model's forward on (None: latency is not measured)."""
        return None

    def compare(self, new: dict, ref: dict) -> float:
        """``new`` against ``ref`` on the headline metric: a difference (accuracy points) or a ratio - 1."""
        raise NotImplementedError

    # -- teacher outputs (`raydistill teacher-logits`) --------------------------------------------------
    def teacher_inputs(self, cfg, storage: Path) -> tuple[dict[str, np.ndarray], dict]:
        """The rows a teacher labels for offline distillation, in their fixed order (NumPy columns, the
        cache's input columns), and the task info."""
        raise NotImplementedError

    def tokens_per_row(self, inputs: dict[str, np.ndarray]) -> int:
        """Output distributions per input row (a causal LM: one per position)."""
        return 1

    def output_size(self, info: dict) -> int:
        """The ids of the output distribution (classes, the tokenizer's vocabulary)."""
        raise NotImplementedError

    def teacher_logits(self, model, rows: dict[str, np.ndarray], device, info: dict) -> torch.Tensor:
        """``model``'s logits ``(rows, [S,] output_size)`` on a slice of :meth:`teacher_inputs`' rows."""
        raise NotImplementedError

    # -- worker -----------------------------------------------------------------------------------------
    def train_columns(self, offline: bool) -> list[str]:
        raise NotImplementedError

    def eval_columns(self) -> list[str]:
        raise NotImplementedError

    def build_model(self, model: dict, task_info: dict):
        raise NotImplementedError

    def layout(self, model) -> Layout:
        """The model's hidden layers (widths), as loss terms on hidden states address them."""
        return Layout(())

    def outputs(self, model, batch: dict, need: Needs, spec) -> Outputs:
        """Run ``model`` on the batch for what ``need`` asks (gradients as the caller's mode allows)."""
        raise NotImplementedError

    def cached_outputs(self, batch: dict, name: str, need: Needs, model) -> Outputs | None:
        """Teacher ``name``'s outputs kept in the batch by ``prepare`` (None: not kept, run the teacher)."""
        return None

    def targets(self, batch: dict, spec) -> dict[str, Any]:
        """``StepOutputs`` fields of the batch: labels, mask, kd_mask, vocab, count."""
        raise NotImplementedError

    def prepare(self, batch: dict, spec, teachers: dict, needs: dict) -> dict:
        """Attach what the loss needs once (e.g. the teachers' outputs) and drop rows the stage cannot use."""
        return batch

    def forward(self, model, batch: dict, spec, teachers: dict, needs: dict) -> StepOutputs:
        """The student's outputs (with gradients) and each teacher's (without) that ``needs`` asks for
        (``{None: student's Needs, name: teacher's}``), with the batch's labels and masks."""
        student = self.outputs(model, batch, needs.get(None, Needs()), spec)
        outs = {}
        for name, need in needs.items():
            if name is None:
                continue
            if name == spec.offline_teacher:
                outs[name] = Outputs(topk=(batch["topk_values"], batch["topk_indices"]),
                                     topk_tail=batch.get("topk_tail"))  # in the batch when the loss uses it
                continue
            cached = self.cached_outputs(batch, name, need, teachers[name])
            if cached is None:
                with torch.no_grad():
                    cached = self.outputs(teachers[name], batch, need, spec)
            outs[name] = cached
        return StepOutputs(student=student, teachers=outs, **self.targets(batch, spec))

    def loss(self, model, batch: dict, spec, teachers: dict, criterion,
             values: dict | None = None) -> tuple[torch.Tensor, int]:
        """The stage's loss on one batch (the student's forward included) and the items it counted (rows or
        tokens, for throughput): ``criterion`` (a ``raydistill.losses.Criterion``) over :meth:`forward`.
        ``values``: a dict that receives each term's value on the batch (``Criterion.forward``)."""
        out = self.forward(model, batch, spec, teachers, criterion.needs())
        return criterion(out, values=values), out.count

    def evaluate(self, model, data: dict, teacher=None, task_info: dict | None = None) -> dict[str, Any]:
        raise NotImplementedError

    # -- shared helpers ----------------------------------------------------------------------------
    def to_tensors(self, arrays: dict, device) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in arrays.items():
            dt = torch.float32 if k in self.float_columns else torch.int64
            out[k] = torch.as_tensor(np.ascontiguousarray(v), device=device).to(dt)
        return out


def shard_arrays(shard, columns) -> dict[str, np.ndarray]:
    """All rows of a Ray Data shard as NumPy columns (the ones present of ``columns``)."""
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy", prefetch_batches=1):
        for c in columns:
            if c in batch:
                parts[c].append(np.asarray(batch[c]))
    return {c: np.concatenate(v) for c, v in parts.items() if v}


def teacher_key(name: str, what: str) -> str:
    """The batch column holding teacher ``name``'s kept output ``what`` (``logits``, ``last``, ``h3``)."""
    return f"teacher.{name}.{what}"
