"""raydistill.compress: masks, schedule, GradualPruner, compress() + reports, sparse checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raydistill.compress import (GradualPruner, block_mask, compress, cubic_sparsity, global_magnitude_masks,
                                 load_sparse, magnitude_mask, model_sparsity_report, nm_mask, save_sparse)
from raydistill.ops import SparseLinear


# ---- masks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 33)])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.77, 0.99])
def test_magnitude_mask_exact_count(seeded, shape, s):
    w = torch.randn(shape, generator=seeded)
    m = magnitude_mask(w, s)
    assert m.dtype == torch.bool and m.shape == w.shape
    assert int((~m).sum()) == round(s * w.numel())
    if (~m).any() and m.any():
        assert w.abs()[~m].max() <= w.abs()[m].min()


def test_magnitude_mask_ties_deterministic():
    m = magnitude_mask(torch.ones(2, 4), 0.5)
    assert m.tolist() == [[False, False, False, False], [True, True, True, True]]


def test_global_masks_exact_count(seeded):
    ws = {"a": torch.randn(10, 7, generator=seeded), "b": 3 * torch.randn(5, 9, generator=seeded)}
    ms = global_magnitude_masks(ws, 0.6)
    assert sum(int((~m).sum()) for m in ms.values()) == round(0.6 * 115)
    kept = torch.cat([ws[k].abs()[ms[k]] for k in ws])
    pruned = torch.cat([ws[k].abs()[~ms[k]] for k in ws])
    assert pruned.max() <= kept.min()


@pytest.mark.parametrize("cols", [8, 10, 13])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (4, 4)])
def test_nm_mask_groups(seeded, cols, n, m):
    w = torch.randn(6, cols, generator=seeded)
    mask = nm_mask(w, n, m)
    for g0 in range(0, cols, m):
        g = mask[:, g0:g0 + m]
        size = g.shape[1]
        assert (g.sum(1) == min(n, size)).all()  # exactly n (tail: min(n, tail size)) kept per group
        # the kept ones are the largest in their group
        a = w[:, g0:g0 + m].abs()
        for r in range(6):
            if g[r].any() and (~g[r]).any():
                assert a[r][~g[r]].max() <= a[r][g[r]].min()


def test_block_mask(seeded):
    for shape, b, s in [((8, 8), 4, 0.5), ((10, 7), 3, 0.6), ((9, 12), (2, 4), 0.3), ((5, 5), 2, 0.9)]:
        w = torch.randn(shape, generator=seeded)
        mask = block_mask(w, s, b)
        bh, bw = (b, b) if isinstance(b, int) else b
        for i in range(0, shape[0], bh):
            for j in range(0, shape[1], bw):
                blk = mask[i:i + bh, j:j + bw]
                assert blk.all() or not blk.any()
        zeros = int((~mask).sum())
        target = round(s * w.numel())
        assert zeros <= target and target - zeros < bh * bw


def test_mask_argument_errors():
    w = torch.randn(4, 8)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_mask(w, bad)
    with pytest.raises(ValueError, match="n must be"):
        nm_mask(w, 5, 4)
    with pytest.raises(ValueError, match="sparsity"):
        block_mask(w, 1.0, 2)
    with pytest.raises(TypeError, match="block"):
        block_mask(w, 0.5, "x")
    with pytest.raises(TypeError, match="weight"):
        magnitude_mask([1.0], 0.5)


# ---- schedule -----------------------------------------------------------------------------------------


def test_cubic_sparsity_points():
    f = lambda s, **k: cubic_sparsity(s, final_sparsity=0.9, end_step=10, frequency=2, **k)  # noqa: E731
    assert f(0) == 0.0 and f(1) == 0.0
    assert f(2) == pytest.approx(0.9 * (1 - 0.8 ** 3))  # 0.4392
    assert f(3) == pytest.approx(0.4392)
    assert f(5) == pytest.approx(0.7056)
    assert f(8) == pytest.approx(0.9 * (1 - 0.2 ** 3))
    assert f(10) == 0.9 and f(1000) == 0.9
    g = lambda s: cubic_sparsity(s, initial_sparsity=0.2, final_sparsity=0.9, begin_step=100,  # noqa: E731
                                 end_step=200, frequency=10)
    assert g(0) == 0.2 and g(99) == 0.2 and g(100) == 0.2
    assert g(155) == pytest.approx(0.9 - 0.7 * 0.125)  # t = 150
    assert g(200) == 0.9
    with pytest.raises(ValueError, match="frequency"):
        cubic_sparsity(0, final_sparsity=0.5, end_step=10, frequency=0)
    with pytest.raises(ValueError, match="final_sparsity"):
        cubic_sparsity(0, final_sparsity=1.0, end_step=10)
    with pytest.raises(ValueError, match="end_step"):
        cubic_sparsity(0, final_sparsity=0.5, begin_step=5, end_step=2)


# ---- GradualPruner -----------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_pruner_keeps_pruned_weights_zero(seeded, opt_name):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=seeded)))
    model = Net()
    pruner = GradualPruner(model, 0.75, begin_step=2, end_step=10, frequency=2, exclude="head")
    assert set(pruner.layers) == {"fc1", "fc2"}
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    prev = None
    for step in range(16):
        model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        target = pruner.step(step)
        assert target == pytest.approx(cubic_sparsity(step, final_sparsity=0.75, begin_step=2, end_step=10,
                                                       frequency=2))
        for k, mod in pruner.layers.items():
            assert (mod.weight[~pruner.masks[k]] == 0).all()
            if prev is not None:
                assert not (pruner.masks[k] & ~prev[k]).any()  # monotone: pruned stays pruned
        prev = {k: v.clone() for k, v in pruner.masks.items()}
    for k, mod in pruner.layers.items():
        assert int((~pruner.masks[k]).sum()) == round(0.75 * mod.weight.numel())  # exact per layer
    assert pruner.sparsity() >= 0.75 - 1 / 448
    assert (model.head.weight != 0).all()


def test_pruner_global_nm_block_and_ddp_names(seeded):
    model = Net()
    wrapped = nn.DataParallel(model)  # names carry a "module." prefix like DDP
    p = GradualPruner(wrapped, 0.5, end_step=0, scope="global", include=["fc*"])
    assert set(p.layers) == {"fc1", "fc2"}
    p.step(0)
    assert sum(int((~m).sum()) for m in p.masks.values()) == round(0.5 * (12 * 16 + 16 * 16))
    nm = GradualPruner(Net(), 0.5, method="nm", begin_step=3, end_step=5, n=2, m=4)
    assert nm.step(2) == 0.0 and all(m.all() for m in nm.masks.values())
    assert nm.step(3) == 0.5
    for m in nm.masks.values():
        assert (m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all()
    bl = GradualPruner(Net(), 0.5, method="block", end_step=0, block=4)
    bl.step(0)
    assert 0.4 < bl.mask_sparsity() <= 0.5
    for m in bl.masks.values():
        for i in range(0, m.shape[0], 4):
            for j in range(0, m.shape[1], 4):
                assert m[i:i + 4, j:j + 4].all() or not m[i:i + 4, j:j + 4].any()
    with pytest.raises(ValueError, match="method"):
        GradualPruner(Net(), 0.5, method="random", end_step=1)
    with pytest.raises(ValueError, match="final_sparsity"):
        GradualPruner(Net(), 1.0, end_step=1)
    with pytest.raises(ValueError, match="n must be"):
        GradualPruner(Net(), 0.5, method="nm", end_step=1, n=5, m=4)
    with pytest.raises(ValueError, match="no nn.Linear"):
        GradualPruner(Net(), 0.5, end_step=1, include="nothing*")


def test_pruner_state_dict_round_trip():
    torch.manual_seed(0)
    model = Net()
    p = GradualPruner(model, 0.6, end_step=4, frequency=1)
    for s in range(3):
        p.step(s)
    state = p.state_dict()
    model2 = Net()
    model2.load_state_dict(model.state_dict())
    p2 = GradualPruner(nn.DataParallel(model2), 0.6, end_step=4, frequency=1)
    p2.load_state_dict(state)
    assert p2.last_step == 2
    for k in p.masks:
        assert torch.equal(p.masks[k], p2.masks[k])
    with pytest.raises(ValueError, match="layers"):
        GradualPruner(Net(), 0.6, end_step=4, include="fc1").load_state_dict(state)


# ---- compress + reports --------------------------------------------------------------------------------


def test_compress_report_by_hand():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    masks = {"0": torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool),
             "2": torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)}
    with torch.no_grad():
        for k, m in masks.items():
            model[int(k)].weight.mul_(m)
    before = model_sparsity_report(model, masks)
    x = torch.randn(5, 4)
    y0 = model(x)
    rep = compress(model, masks=masks)
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    assert torch.allclose(model(x), y0, atol=1e-6)
    # layer 0: 12 weights, 6 kept: CSR = 6*4 values + 6*4 cols + 4*4 row pointers = 64 B, dense 48 B
    # layer 2: 6 weights, 3 kept: 3*4 + 3*4 + 3*4 = 36 B, dense 24 B; biases 5 params = 20 B
    assert [(r.name, r.shape, r.params, r.nonzeros, r.dense_bytes, r.csr_bytes) for r in rep.layers] == [
        ("0", (3, 4), 12, 6, 48, 64), ("2", (2, 3), 6, 3, 24, 36)]
    assert rep.total_sparsity == pytest.approx(9 / 18)
    assert rep.params == 23 and rep.nonzero_params == 14
    assert rep.dense_bytes == 92 and rep.compressed_bytes == 120
    assert rep.compression_ratio == pytest.approx(92 / 120)
    assert before.to_dict() == rep.to_dict()
    assert rep.to_dict()["layers"][0]["shape"] == [3, 4]
    from rich.table import Table

    assert isinstance(rep.table(), Table)


def test_compress_methods_and_errors(seeded):
    model = Net()
    rep = compress(model, 0.8, exclude="head")
    assert [r.name for r in rep.layers] == ["fc1", "fc2"]
    assert all(r.nonzeros == r.params - round(0.8 * r.params) for r in rep.layers)
    assert isinstance(model.head, nn.Linear)
    m2 = Net()
    rep = compress(m2, method="nm", n=1, m=4)
    assert all(r.sparsity == pytest.approx(0.75) for r in rep.layers)
    m3 = Net()
    rep = compress(m3, 0.5, method="block", block=4, include=["fc2"])
    assert [r.name for r in rep.layers] == ["fc2"] and rep.layers[0].sparsity == 0.5
    with pytest.raises(ValueError, match="method"):
        compress(Net(), 0.5, method="bogus")
    with pytest.raises(ValueError, match="sparsity"):
        compress(Net())
    with pytest.raises(ValueError, match="shape"):
        compress(Net(), masks={"fc1": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not nn.Linear"):
        compress(Net(), masks={"nope": torch.ones(3, 3, dtype=torch.bool)})


def test_pruner_masks_into_compress_and_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = Net()
    p = GradualPruner(nn.DataParallel(model), 0.7, end_step=0, exclude="head")
    p.step(0)
    live = model_sparsity_report(model, p.masks)
    x = torch.randn(6, 12)
    y0 = model(x)
    rep = compress(model, masks=p.masks)
    assert rep.to_dict() == live.to_dict()
    assert torch.allclose(model(x), y0, atol=1e-5)
    path = tmp_path / "sparse.safetensors"
    save_sparse(model, path)
    fresh = load_sparse(Net, path)
    assert isinstance(fresh.fc1, SparseLinear) and isinstance(fresh.head, nn.Linear)
    assert torch.allclose(fresh(x), y0, atol=1e-5)
    assert model_sparsity_report(fresh).to_dict() == rep.to_dict()
    with pytest.raises(ValueError, match="sparse checkpoint"):
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        load_sparse(Net(), tmp_path / "plain.safetensors")
