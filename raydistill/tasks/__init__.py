"""What differs between tasks, behind one interface (``Task``): data, how batches are made, how teacher and
student outputs are produced (what loss terms read), metrics, evaluation and report columns.
``get_task(name)`` returns one (``TASKS``: name -> class).

* ``classification`` (MNIST-1D): rows ``x`` -> ``(B, C)`` logits; metrics accuracy, macro precision /
  recall / F1.
* ``causal_lm`` (a text corpus): packed ``input_ids`` blocks -> ``(B, S, V)`` logits, per-token loss;
  metrics perplexity, next-token accuracy, teacher agreement.
"""

from __future__ import annotations

from raydistill.tasks.base import IGNORE_INDEX, Task


# task name (``Config.data.task``) -> "module:class"
TASKS = {"classification": "raydistill.tasks.classification:ClassificationTask",
         "causal_lm": "raydistill.tasks.causal_lm:CausalLMTask"}


def get_task(name: str) -> Task:
    import importlib

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    mod, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(mod), cls)()


__all__ = ["IGNORE_INDEX", "TASKS", "Task", "get_task"]
