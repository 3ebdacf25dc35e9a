"""Classification (MNIST-1D): rows ``x`` (float vectors) -> ``(B, C)`` logits; labels ``y`` (-1: an
unlabelled transfer-set row, which the teacher labels)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raydistill.tasks.base import IGNORE_INDEX, Task


class ClassificationTask(Task):
    name = "classification"
    metric = "accuracy"
    higher_is_better = True
    float_columns = ("x", "topk_values")
    latency_batches = (1, 256)

    def latency_input(self, task_info: dict, batch: int) -> torch.Tensor:
        """A random ``(batch, in_features)`` float batch (MNIST-1D: 40 features)."""
        from raydistill.data.mnist1d import IN_FEATURES

        return torch.randn(batch, int(task_info.get("in_features", IN_FEATURES)))

    def train_columns(self, offline: bool) -> list[str]:
        return ["x", "y"] + (["topk_values", "topk_indices"] if offline else [])

    def eval_columns(self) -> list[str]:
        return ["x", "y", "split"]

    def build_model(self, model: dict, task_info: dict):
        from raydistill.models import build_model

        return build_model(model)

    def prepare(self, batch: dict, spec, teacher) -> dict:
        if teacher is not None and "t" not in batch:
            batch["t"] = predict(teacher, batch["x"])
        if spec.kind == "kd" and spec.kd.hard_labels == "teacher_argmax":
            top1 = batch["t"].argmax(1) if "t" in batch else batch["topk_indices"][:, 0]
            batch["y"] = torch.where(batch["y"] < 0, top1, batch["y"])
        if spec.kind == "ce":  # labels only: drop the unlabelled transfer rows
            keep = batch["y"] >= 0
            batch = {k: v[keep] for k, v in batch.items()}
        return batch

    def loss(self, model, batch: dict, spec, teacher) -> tuple[torch.Tensor, int]:
        logits = model(batch["x"])
        n = len(batch["x"])
        if spec.kind == "ce":
            return F.cross_entropy(logits, batch["y"]), n
        from raydistill import ops

        kd = spec.kd
        kw = dict(temperature=kd.temperature, divergence=kd.divergence, beta=kd.beta, ignore_index=IGNORE_INDEX)
        if spec.offline:
            def call(rows, labels, alpha):
                return ops.kd_loss_topk(logits[rows], batch["topk_values"][rows], batch["topk_indices"][rows],
                                        labels, alpha=alpha, **kw)
        else:
            def call(rows, labels, alpha):
                return ops.kd_loss(logits[rows], batch["t"][rows], labels, alpha=alpha, **kw)
        y = batch["y"]
        lab = y >= 0
        if bool(lab.all()):
            return call(slice(None), y, kd.alpha), n
        # hard_labels == "none": unlabelled rows get the soft term only (alpha = 1 for them)
        n_l = int(lab.sum())
        total = logits.new_zeros((), dtype=torch.float32)
        if n_l:
            total = total + n_l * call(lab, y[lab], kd.alpha)
        if n - n_l:
            total = total + (n - n_l) * call(~lab, None, 1.0)
        return total / n, n

    def evaluate(self, model, data: dict, teacher=None, task_info: dict | None = None) -> dict[str, Any]:
        """``val_accuracy`` on the val split; accuracy, macro precision / recall / F1 on the test split."""
        split = data["split"]
        val = {k: v[split == 0] for k, v in data.items()}
        test = {k: v[split == 1] for k, v in data.items()}
        va = classification_metrics(predict(model, val["x"]).argmax(1).cpu().numpy(), val["y"].cpu().numpy())
        te = classification_metrics(predict(model, test["x"]).argmax(1).cpu().numpy(), test["y"].cpu().numpy())
        return {"val_accuracy": va["accuracy"], **te}


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else \
        torch.zeros(0, 10)
    model.train(was)
    return out


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
