"""One optimizer step over ``k`` micro-batches (``distill.grad_accum_steps``).

Every micro-batch's loss is a mean over its items (tokens of a causal LM, rows of a classifier). Scaling
each by ``1/k`` equals the mean over the ``k x batch_size`` rows only when every micro-batch counts the
same number of items, which a causal LM's padded tail block breaks. So each micro-batch's loss is weighted
by its item count ``n_i`` and the summed gradient divided by ``N = sum n_i`` (with several workers by the
workers' mean ``N``, since DDP averages their gradients): the update is then exactly the one of the mean
over all ``N`` items of the ``k`` micro-batches, the same as one batch of ``k x batch_size`` rows.
``k = 1`` is the plain step (``loss.backward()``). The gradients are synchronised across workers once, in
the last micro-batch's backward (``DDP.no_sync`` / FSDP2 ``set_requires_gradient_sync``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from raydistill.distill.precision import Precision


@contextlib.contextmanager
def _grad_sync(model, sync: bool):
    """Forward and backward of a micro-batch with (``sync``) or without the gradient all-reduce."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def optimizer_step(model, optimizer, micro_batches: Sequence[dict],
                   loss_fn: Callable[[dict], tuple[torch.Tensor, int]], precision: Precision, *,
                   grad_clip: float | None = None, world: int = 1, extra_params: Sequence = ()) -> tuple[float, int]:
    """Zero the gradients, forward + backward every micro-batch, clip and step once. Returns the step's
    loss (the item-weighted mean of the micro-batch losses) and its item count. ``extra_params``: trained
    parameters outside ``model`` (a loss term's projections): averaged over the workers here (DDP averages
    the model's), scaled and clipped with the model's."""
    k = len(micro_batches)
    if k < 1:
        raise ValueError("optimizer_step needs at least one micro-batch")
    precision.sync()  # a compute copy (bf16 / fp16) holds the master weights of the last step and the pruner
    optimizer.zero_grad(set_to_none=True)
    weighted = torch.zeros((), dtype=torch.float64)
    n_total = 0
    for j, batch in enumerate(micro_batches):
        with _grad_sync(model, j == k - 1):
            with precision.autocast():
                loss, n = loss_fn(batch)
            precision.backward(loss if k == 1 else loss * float(n))
        weighted += float(loss.detach()) * (1 if k == 1 else n)
        n_total += int(n)
    params = [*precision.master_gradients(model), *extra_params]
    if world > 1:
        for p in extra_params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)
    if k > 1:
        denom = torch.tensor(float(n_total), dtype=torch.float64)
        if world > 1:  # DDP averaged sum_i n_i g_i over the workers: divide by their mean N
            t = denom.to(next(p.device for p in model.parameters()))
            torch.distributed.all_reduce(t)
            denom = t.cpu() / world
        if float(denom) > 0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(float(denom))
        step_loss = float(weighted) / max(1, n_total)
    else:
        step_loss = float(weighted)
    precision.step(optimizer, params, grad_clip)
    return step_loss, n_total
