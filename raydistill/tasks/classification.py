"""Classification (MNIST-1D): rows ``x`` (float vectors) -> ``(B, C)`` logits; labels ``y`` (-1: an
unlabelled transfer-set row, which the teacher labels).

Hidden states (``hidden`` / ``relation`` terms): the outputs of the model's hidden modules
(``raydistill.models.hidden_modules``: a CNN's conv layers, an MLP's hidden ``nn.Linear`` layers), conv
maps averaged over positions, so a CNN teacher's features reach an MLP student through a projection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydistill.losses.outputs import Needs, Outputs
from raydistill.losses.terms import Layout
from raydistill.tasks.base import IGNORE_INDEX, Task, teacher_key


class ClassificationTask(Task):
    name = "classification"
    metric = "accuracy"
    higher_is_better = True
    metric_label = "test accuracy"
    metric_fmt = ".4f"
    baseline_key = "gain_over_baseline"
    throughput_unit = "samples"
    reported_metrics = ("val_accuracy", "accuracy", "macro_f1", "macro_precision", "macro_recall",
                        "samples_per_s", "latency_ms_b1", "latency_ms_b256")
    report_columns = (("test accuracy (95% CI)", "accuracy", "{:.2%}"), ("macro F1", "macro_f1", "{:.3f}"),
                      ("macro precision", "macro_precision", "{:.3f}"), ("macro recall", "macro_recall", "{:.3f}"),
                      ("sparsity", "sparsity", "{:.1%}"), ("compression", "compression_ratio", "{:.2f}x"),
                      ("bytes", "model_bytes", "{:,}"), ("ms/batch 1", "latency_ms_b1", "{:.3f}"),
                      ("ms/batch 256", "latency_ms_b256", "{:.3f}"))
    compare_text = "{:+.1f} points"
    float_columns = ("x", "topk_values", "topk_tail")
    uses_transfer_set = True
    supports_quantize = True
    max_topk = 10
    teacher_batch_rows = 2048
    latency_batches = (1, 256)

    # -- driver -----------------------------------------------------------------------------------------
    def task_info(self, cfg, storage: Path) -> dict:
        return {}

    def datasets(self, cfg, storage: Path, *, transfer: bool) -> tuple[dict, int]:
        """Labelled train rows (+ the unlabelled transfer rows, ``y = -1``, when ``transfer``) and one eval
        dataset (split column: 0 = val, 1 = test: one Ray Data execution per worker start)."""
        from raydistill.data import to_ray_dataset
        from raydistill.data.ray_data import UNLABELLED

        split, extra = load_arrays(cfg, storage)
        x, y = split.x_train, split.y_train
        if transfer:
            x = np.concatenate([x, extra])
            y = np.concatenate([y, np.full(len(extra), UNLABELLED, np.int64)])
        return {"train": to_ray_dataset(x=x, y=y), "eval": _eval_dataset(split)}, len(y)

    def eval_dataset(self, cfg, storage: Path):
        from raydistill.data import load_mnist1d

        return _eval_dataset(load_mnist1d(cfg.data, storage / "datasets"))

    def train_rows(self, cfg, storage: Path, *, transfer: bool) -> int:
        d = cfg.data
        return int(d.num_train - max(1, round(d.num_train * d.val_fraction))
                   + (cfg.distill.transfer_set.size if transfer else 0))

    def calibration_inputs(self, cfg, storage: Path) -> torch.Tensor:
        return torch.from_numpy(load_arrays(cfg, storage)[0].x_train)

    def test_metrics(self, cfg, model, storage: Path, info: dict, *, teacher=None, samples: bool = True) -> dict:
        """Accuracy (with its 95% bootstrap interval over test examples), macro F1 / precision / recall, and
        under ``"_items"`` each example's correctness -- the teacher's too (``teacher()``: the teacher module
        or None) -- for paired comparisons (``raydistill.distill.verdict``)."""
        from raydistill.data import load_mnist1d
        from raydistill.tasks.stats import mean_ci

        split = load_mnist1d(cfg.data, storage / "datasets")
        x = torch.from_numpy(split.x_test)
        pred = predict(model, x).argmax(1).numpy()
        correct = (pred == np.asarray(split.y_test)).astype(np.float64)
        items = {"correct": correct.tolist()}
        t_net = teacher() if teacher else None
        if t_net is not None:
            items["teacher_correct"] = (predict(t_net, x).argmax(1).numpy() == split.y_test).astype(np.float64).tolist()
        return {**classification_metrics(pred, split.y_test), "accuracy_ci95": mean_ci(correct),
                "eval_examples": int(len(correct)), "_items": items}

    def latency_input(self, info: dict, batch: int) -> torch.Tensor:
        from raydistill.data.mnist1d import IN_FEATURES

        return torch.randn(batch, IN_FEATURES)

    def compare(self, new: dict, ref: dict) -> float:
        return new["accuracy"] - ref["accuracy"]

    # -- teacher outputs --------------------------------------------------------------------------------
    def teacher_inputs(self, cfg, storage: Path) -> tuple[dict[str, np.ndarray], dict]:
        """MNIST-1D's train rows then the transfer set (``x`` float32, ``y`` int64, -1 for the unlabelled
        transfer rows)."""
        from raydistill.data.ray_data import UNLABELLED

        split, transfer = load_arrays(cfg, storage)
        x = np.concatenate([split.x_train, transfer]).astype(np.float32)
        y = np.concatenate([split.y_train, np.full(len(transfer), UNLABELLED, np.int64)]).astype(np.int64)
        return {"x": x, "y": y}, self.task_info(cfg, storage)

    def output_size(self, info: dict) -> int:
        return int(info.get("num_classes", 10))

    def teacher_logits(self, model, rows: dict[str, np.ndarray], device, info: dict) -> torch.Tensor:
        return model(torch.as_tensor(rows["x"], dtype=torch.float32, device=device))

    # -- worker -----------------------------------------------------------------------------------------
    def train_columns(self, offline: bool) -> list[str]:
        return ["x", "y"] + (["topk_values", "topk_indices", "topk_tail"] if offline else [])

    def eval_columns(self) -> list[str]:
        return ["x", "y", "split"]

    def build_model(self, model: dict, task_info: dict):
        from raydistill.models import build_model

        return build_model(model)

    def layout(self, model) -> Layout:
        from raydistill.data.mnist1d import IN_FEATURES

        p = next(iter(model.parameters()), None)
        x = torch.zeros(2, IN_FEATURES, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
        was = model.training
        model.eval()  # a probe: no batch-norm statistics move
        with torch.no_grad():
            out = self.outputs(model, {"x": x}, Needs(hidden=frozenset(range(1, 1 + len(_modules(model))))), None)
        model.train(was)
        return Layout(tuple(int(out.hidden[i].shape[-1]) for i in sorted(out.hidden)))

    def outputs(self, model, batch: dict, need: Needs, spec) -> Outputs:
        caught: dict[int, Any] = {}
        handles = [m.register_forward_hook(lambda _m, _i, out, i=i: caught.__setitem__(i, out))
                   for i, m in enumerate(_modules(model) if need.hidden else [], 1) if i in need.hidden]
        try:
            logits = model(batch["x"])
        finally:
            for h in handles:
                h.remove()
        missing = sorted(set(need.hidden) - set(caught))
        if missing:
            raise ValueError(f"hidden layers {missing} did not run in the model's forward")
        return Outputs(logits=logits if need.logits else None, hidden={i: _pool(v) for i, v in caught.items()})

    def cached_outputs(self, batch: dict, name: str, need: Needs, model) -> Outputs | None:
        keys = ([teacher_key(name, "logits")] if need.logits else []) + \
            [teacher_key(name, f"h{i}") for i in sorted(need.hidden)]
        if not all(k in batch for k in keys):
            return None
        return Outputs(logits=batch.get(teacher_key(name, "logits")) if need.logits else None,
                       hidden={i: batch[teacher_key(name, f"h{i}")] for i in need.hidden})

    def targets(self, batch: dict, spec) -> dict[str, Any]:
        y = batch["y"]
        labelled = y >= 0
        n = len(y)
        return {"labels": torch.where(labelled, y, torch.full_like(y, IGNORE_INDEX)),
                "mask": torch.ones(n, dtype=torch.bool, device=y.device),
                "kd_mask": None if bool(labelled.all()) else torch.ones(n, dtype=torch.bool, device=y.device),
                "vocab": self.output_size(spec.task_info), "ignore_index": IGNORE_INDEX, "count": n}

    def prepare(self, batch: dict, spec, teachers: dict, needs: dict) -> dict:
        """The teachers' outputs for every row, once (``predict`` in eval mode); unlabelled rows get the
        first teacher's argmax as their hard label (``transfer_set.hard_labels: teacher_argmax``); a
        labels-only stage drops them."""
        for name, need in needs.items():
            if name is None or name not in teachers or self.cached_outputs(batch, name, need, None) is not None:
                continue
            out = _predict_outputs(self, teachers[name], batch["x"], Needs(True, False, need.hidden))
            batch[teacher_key(name, "logits")] = out.logits
            batch.update({teacher_key(name, f"h{i}"): h for i, h in out.hidden.items()})
        if spec.kind == "kd" and spec.hard_labels == "teacher_argmax":
            top1 = _first_teacher_top1(batch, spec, needs)
            if top1 is not None:
                batch["y"] = torch.where(batch["y"] < 0, top1, batch["y"])
        if spec.kind == "ce":  # labels only: drop the unlabelled transfer rows
            keep = batch["y"] >= 0
            batch = {k: v[keep] for k, v in batch.items()}
        return batch

    def evaluate(self, model, data: dict, teacher=None, task_info: dict | None = None) -> dict[str, Any]:
        """``val_accuracy`` on the val split; accuracy, macro precision / recall / F1 on the test split."""
        split = data["split"]
        val = {k: v[split == 0] for k, v in data.items()}
        test = {k: v[split == 1] for k, v in data.items()}
        va = classification_metrics(predict(model, val["x"]).argmax(1).cpu().numpy(), val["y"].cpu().numpy())
        te = classification_metrics(predict(model, test["x"]).argmax(1).cpu().numpy(), test["y"].cpu().numpy())
        return {"val_accuracy": va["accuracy"], **te}


def _eval_dataset(split):
    """val then test rows (``split`` column 0 / 1) as one Ray dataset."""
    from raydistill.data import val_test_dataset

    return val_test_dataset({"x": split.x_val, "y": split.y_val}, {"x": split.x_test, "y": split.y_test})


def load_arrays(cfg, storage: Path):
    """The MNIST-1D split and the unlabelled transfer set (cached under ``<storage>/datasets``)."""
    from raydistill.data import load_mnist1d, load_transfer_set

    split = load_mnist1d(cfg.data, storage / "datasets")
    transfer = load_transfer_set(cfg.data, cfg.distill.transfer_set, storage / "datasets")
    return split, transfer


def _modules(model) -> list:
    from raydistill.models import hidden_modules

    return hidden_modules(model)


def _pool(out) -> torch.Tensor:
    """A hidden module's output as one vector per row: conv maps ``(B, C, L)`` averaged over positions."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.flatten(2).mean(-1) if out.dim() > 2 else out


def _first_teacher_top1(batch: dict, spec, needs: dict) -> torch.Tensor | None:
    """The argmax of the first teacher whose logits the stage reads (offline: the top-1 of its top-k)."""
    for name, need in needs.items():
        if name is None or not need.logits:
            continue
        if name == spec.offline_teacher:
            return offline_argmax(batch)
        key = teacher_key(name, "logits")
        if key in batch:
            return batch[key].argmax(1)
    return None


@torch.no_grad()
def _predict_outputs(task: ClassificationTask, model, x: torch.Tensor, need: Needs,
                     batch_size: int = 4096) -> Outputs:
    was = model.training
    model.eval()
    parts = [task.outputs(model, {"x": x[i:i + batch_size]}, need, None) for i in range(0, len(x), batch_size)]
    model.train(was)
    if not parts:
        return Outputs(logits=torch.zeros(0, 10, device=x.device), hidden={})
    return Outputs(logits=torch.cat([p.logits for p in parts]),
                   hidden={i: torch.cat([p.hidden[i] for p in parts]) for i in parts[0].hidden})


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else \
        torch.zeros(0, 10)
    model.train(was)
    return out


def offline_argmax(batch: dict) -> torch.Tensor:
    """The teacher's top-1 class from its cached top-k (``topk_indices`` are not sorted by value)."""
    return batch["topk_indices"].gather(1, batch["topk_values"].argmax(1, keepdim=True)).squeeze(1)


def classification_metrics(pred: np.ndarray, y: np.ndarray, num_classes: int = 10) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 (classes absent from labels and predictions do not
    count, as in sklearn's ``labels=None``)."""
    pred, y = np.asarray(pred), np.asarray(y)
    acc = float((pred == y).mean()) if len(y) else 0.0
    f1s, precs, recs = [], [], []
    for c in range(num_classes):
        if not ((pred == c).any() or (y == c).any()):
            continue
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        precs.append(tp / (tp + fp) if tp + fp else 0.0)
        recs.append(tp / (tp + fn) if tp + fn else 0.0)
    mean = (lambda v: float(np.mean(v)) if v else 0.0)
    return {"accuracy": acc, "macro_f1": mean(f1s), "macro_precision": mean(precs),
            "macro_recall": mean(recs)}
