"""A stage's training budget in optimizer steps, its learning-rate schedule with warmup, and the data position
a step checkpoint records (issue 22).

Units: a *micro-batch* is ``batch_size`` rows on one worker; an *optimizer step* is ``grad_accum_steps``
micro-batches on every worker. An epoch is ``steps_per_epoch`` micro-batches per worker (the leftover that
does not fill an optimizer step is dropped, so every step sees exactly ``grad_accum_steps`` micro-batches).

    plan(epochs, max_steps, micro_per_epoch, accum)  -> Budget (epochs, optimizer steps per epoch, total)
    steps_for_tokens(max_tokens, ...)                -> the optimizer steps that cover a token budget
    DataPosition                                     where in which epoch a checkpoint was taken
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Budget:
    epochs: int               # epochs to run (the last one may stop early at total_steps)
    micro_per_epoch: int      # micro-batches per epoch per worker (a multiple of accum)
    steps_per_epoch: int      # optimizer steps per epoch
    total_steps: int          # optimizer steps of the whole stage (the schedule's length)


def plan(epochs: int | None, max_steps: int | None, micro_per_epoch: int, accum: int) -> Budget:
    """The stage's budget: ``epochs`` whole epochs, or ``max_steps`` optimizer steps (then the epochs it
    takes, the last one cut at the budget). ``micro_per_epoch``: the micro-batches one worker has per
    epoch (at least one optimizer step's worth is always used)."""
    accum = max(1, int(accum))
    steps_per_epoch = max(1, int(micro_per_epoch) // accum)
    if max_steps is not None:
        total = int(max_steps)
        epochs = math.ceil(total / steps_per_epoch)
    else:
        if epochs is None:
            raise ValueError("a budget needs epochs or max_steps")
        total = int(epochs) * steps_per_epoch
    return Budget(epochs=int(epochs), micro_per_epoch=steps_per_epoch * accum, steps_per_epoch=steps_per_epoch,
                  total_steps=total)


def steps_for_tokens(max_tokens: int, *, batch_size: int, accum: int, workers: int, seq_len: int) -> int:
    """Optimizer steps whose rows cover ``max_tokens`` training tokens (rows x seq_len over all workers)."""
    per_step = int(batch_size) * max(1, int(accum)) * max(1, int(workers)) * int(seq_len)
    return max(1, math.ceil(int(max_tokens) / per_step))


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int, *, cosine: bool = True):
    """Linear warmup from 0 to the optimizer's lr over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps`` (``cosine=False``: constant after the warmup); transformers' own schedules."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if cosine:
        return get_cosine_schedule_with_warmup(optimizer, int(warmup_steps), max(1, int(total_steps)))
    return get_constant_schedule_with_warmup(optimizer, int(warmup_steps))


@dataclass
class DataPosition:
    """Where a checkpoint was taken: in ``epoch``, after ``batch`` micro-batches of it (per worker), with the
    epoch's running sums so far (its mean loss, throughput) and ``rows`` consumed by the whole run (all
    workers). A run resumed from it skips those micro-batches of ``epoch`` (the materialised shard's order
    is a fixed permutation per epoch) and continues with the next one."""

    epoch: int = 0
    batch: int = 0
    rows: int = 0
    loss_sum: float = 0.0
    steps: int = 0
    items: int = 0
    seconds: float = 0.0
    rng: object = field(default=None, repr=False)   # torch's CPU RNG state (dropout) at the checkpoint

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> "DataPosition | None":
        if not state:
            return None
        known = {k: state[k] for k in cls.__dataclass_fields__ if k in state}
        return cls(**known)
