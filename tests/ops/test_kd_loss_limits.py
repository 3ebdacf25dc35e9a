"""kd_loss at the edge of its domain: temperatures above the documented bound are rejected (never a wrong
number), and duplicate top-k teacher indices are detected."""

from __future__ import annotations

import math

import pytest
import torch

from raydistill import ops
from raydistill.ops import KDLoss, kd_loss, kd_loss_reference, kd_loss_topk


def _logits(rows=64, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g), torch.randn(rows, V, generator=g)


@pytest.mark.parametrize("T", [1.0, 10.0, 50.0, 100.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_up_to_the_bound_the_loss_and_gradient_match_float64(T, divergence):
    s, t = _logits(seed=int(T))
    s.requires_grad_(True)
    loss = kd_loss(s, t, temperature=T, divergence=divergence)
    loss.backward()
    s64 = s.detach().double().requires_grad_(True)
    ref = kd_loss_reference(s64, t.double(), temperature=T, divergence=divergence)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=2e-3), (loss.item(), ref.item())
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-2, atol=2e-2 * float(s64.grad.abs().max()))


@pytest.mark.parametrize("T", [100.5, 1e3, 1e4, 1e5, 2e19, math.inf, math.nan])
def test_temperatures_above_the_bound_are_rejected(T):
    s, t = _logits(4, 16)
    idx = torch.arange(4).repeat(4, 1)
    for call in (lambda: kd_loss(s, t, temperature=T), lambda: kd_loss_reference(s, t, temperature=T),
                 lambda: kd_loss_topk(s, t[:, :4], idx, temperature=T), lambda: KDLoss(temperature=T)):
        with pytest.raises(ValueError, match=r"temperature must be a finite number in \(0, 100\]"):
            call()


def test_the_config_bound_is_the_op_bound():
    from raydistill.config import MAX_TEMPERATURE, ConfigError, load_config

    assert MAX_TEMPERATURE == ops.MAX_TEMPERATURE
    assert load_config(None, [f"distill.temperature={MAX_TEMPERATURE}"]).distill.temperature == MAX_TEMPERATURE
    with pytest.raises(ConfigError, match="distill.temperature"):
        load_config(None, [f"distill.temperature={MAX_TEMPERATURE * 1.01}"])


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_duplicate_topk_indices_are_rejected(divergence):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 20, generator=g, requires_grad=True)
    vals = torch.randn(6, 4, generator=g)
    idx = torch.stack([torch.randperm(20, generator=g)[:4] for _ in range(6)])
    kd_loss_topk(s, vals, idx, temperature=2.0, divergence=divergence).backward()  # distinct: fine
    bad = idx.clone()
    bad[4, 2] = bad[4, 0]
    with pytest.raises(ValueError, match=f"distinct within a row; row 4 .*repeats index {int(bad[4, 0])}"):
        kd_loss_topk(s, vals, bad, temperature=2.0, divergence=divergence)
    with pytest.raises(ValueError, match="distinct"):
        kd_loss_reference(s, vals, temperature=2.0, teacher_topk_indices=bad)
    # leading dims are flattened for the check; int32 indices too
    with pytest.raises(ValueError, match="distinct"):
        kd_loss_topk(s.view(2, 3, 20), vals.view(2, 3, 4), bad.view(2, 3, 4).int(), temperature=2.0)
    # k = 1 cannot repeat
    kd_loss_topk(s, vals[:, :1], idx[:, :1], temperature=2.0)
