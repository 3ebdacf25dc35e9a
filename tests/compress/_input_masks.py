"""Test helper shared by the structured-pruning tests: the reference "original model with some units
zeroed" is the unpruned model with the inputs of chosen layers multiplied by 0/1 masks."""

from __future__ import annotations

from contextlib import contextmanager

from torch import Tensor, nn


@contextmanager
def masked_inputs(masks: dict[nn.Module, Tensor]):
    """While inside, each module's (first) input is multiplied by its mask (forward pre-hooks)."""
    hooks = [mod.register_forward_pre_hook(lambda _m, inp, mask=mask: (inp[0] * mask, *inp[1:]))
             for mod, mask in masks.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
