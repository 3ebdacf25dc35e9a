"""Structured pruning: exact function when removed units are dead, ranking by weight norm and by
activation, shapes and report, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raydistill.compress import prune_structured, resize_structured
from raydistill.compress.structured import unit_pairs


def _mlp(hidden=32, act=nn.ReLU):
    return nn.Sequential(nn.Linear(40, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, 10))


def _randomize(m, g):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_unit_pairs_find_mlp_pairs_only():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.GELU(),
                      nn.Dropout(0.1), nn.Linear(8, 2))
    # Sigmoid(0) != 0: a removed unit would still contribute, so that pair is not prunable
    assert unit_pairs(m) == [("0", "2"), ("4", "7")]


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.Tanh])
@pytest.mark.parametrize("use_calibration", [False, True])
def test_removing_dead_units_keeps_the_function(seeded, act, use_calibration):
    m = _mlp(32, act)
    _randomize(m, seeded)
    dead0 = torch.randperm(32, generator=seeded)[:16]
    dead2 = torch.randperm(32, generator=seeded)[:16]
    with torch.no_grad():  # dead units: zero incoming weights and bias -> output act(0) = 0
        for lin, dead in ((m[0], dead0), (m[2], dead2)):
            lin.weight[dead] = 0
            lin.bias[dead] = 0
    x = torch.randn(50, 40, generator=seeded).double()
    m = m.double()
    ref = m(x)
    rep = prune_structured(m, 0.5, x if use_calibration else None)
    assert rep.widths == {"0": 16, "2": 16}
    assert m[0].weight.shape == (16, 40) and m[2].weight.shape == (16, 16) and m[4].weight.shape == (10, 16)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-12)
    assert rep.ranking == ("activation" if use_calibration else "weight_norm")
    assert rep.params_after < rep.params_before and rep.bytes_after < rep.bytes_before


def test_weight_norm_ranking_keeps_the_largest_rows_in_order(seeded):
    m = _mlp(8)
    _randomize(m, seeded)
    norms = torch.cat([m[0].weight, m[0].bias[:, None]], 1).norm(dim=1)
    keep = torch.argsort(norms, descending=True)[:6].sort().values
    w0, w2 = m[0].weight.detach().clone(), m[2].weight.detach().clone()
    keep2 = torch.argsort(torch.cat([w2, m[2].bias.detach()[:, None]], 1).norm(dim=1),
                          descending=True)[:6].sort().values
    prune_structured(m, 0.25)
    torch.testing.assert_close(m[0].weight, w0[keep])
    # layer 2 loses the columns of layer 0's removed units and its own lowest-norm rows (of the full rows)
    torch.testing.assert_close(m[2].weight, w2[keep2][:, keep])
    assert m[4].weight.shape == (10, 6)


def test_activation_ranking_uses_calibration(seeded):
    m = _mlp(8)
    _randomize(m, seeded)
    with torch.no_grad():  # unit 3: large weights but never active on positive inputs
        m[0].weight[3] = -10.0
        m[0].bias[3] = -1.0
    x = torch.rand(64, 40, generator=seeded)  # positive inputs
    h = torch.relu(m[0](x)).detach()
    imp = (h * h).mean(0).sqrt()
    expect = torch.argsort(imp, descending=True, stable=True)[:4].sort().values
    assert 3 not in expect.tolist()
    w0 = m[0].weight.detach().clone()
    prune_structured(m, 0.5, x, include=["0"])
    torch.testing.assert_close(m[0].weight, w0[expect])
    assert m[2].weight.shape == (8, 4)  # only pair (0, 2) selected: layer 2 keeps its 8 units


def test_resize_structured_loads_a_pruned_state_dict(seeded):
    m = _mlp(32)
    _randomize(m, seeded)
    rep = prune_structured(m, 0.75)
    fresh = resize_structured(_mlp(32), rep.widths)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(4, 40, generator=seeded)
    assert torch.equal(fresh(x), m(x))


@pytest.mark.parametrize("ratio,match", [(1.0, "ratio must be a float in"), (-0.1, "ratio must be a float in"),
                                         ("0.5", "ratio must be a float in"),
                                         (0.99, "would remove every unit of layer '0'")])
def test_bad_ratio(ratio, match):
    with pytest.raises(ValueError, match=match):
        prune_structured(_mlp(8), ratio)


def test_no_pairs_and_non_float_layers_are_errors():
    with pytest.raises(ValueError, match="no Linear -> activation -> Linear pair"):
        prune_structured(nn.Sequential(nn.Linear(4, 2)), 0.5)
    with pytest.raises(ValueError, match="calibration must be a non-empty Tensor"):
        prune_structured(_mlp(8), 0.5, torch.zeros(0, 40))
