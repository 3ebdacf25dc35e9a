"""What differs between tasks, behind one small interface (``Task``): how batches are made, how teacher
and student outputs are produced, the loss terms and the metrics. ``get_task(name)`` returns one.

* ``classification`` (MNIST-1D): rows ``x`` -> ``(B, C)`` logits; metrics accuracy, macro precision /
  recall / F1.
* ``causal_lm`` (a text corpus): packed ``input_ids`` blocks -> ``(B, S, V)`` logits, per-token loss;
  metrics perplexity, next-token accuracy, teacher agreement.
"""

from __future__ import annotations

from raydistill.tasks.base import IGNORE_INDEX, Task


def get_task(name: str) -> Task:
    if name == "classification":
        from raydistill.tasks.classification import ClassificationTask

        return ClassificationTask()
    if name == "causal_lm":
        from raydistill.tasks.causal_lm import CausalLMTask

        return CausalLMTask()
    raise ValueError(f"unknown task {name!r}; use classification or causal_lm")


__all__ = ["IGNORE_INDEX", "Task", "get_task"]
