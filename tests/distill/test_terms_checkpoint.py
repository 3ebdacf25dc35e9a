"""No Ray: a hidden term's projection is trained state of the student's stage: saved in the checkpoint's
train state (never with the model's weights, so evaluation and export never see it) and restored on
resume by the per-worker loop's ``restore``."""

from __future__ import annotations

import types

import torch

from raydistill.distill import checkpointing as ck
from raydistill.losses import Criterion, Layout


def _criterion(seed):
    torch.manual_seed(seed)
    return Criterion([{"type": "kd_logits", "weight": 1.0, "teachers": {"main": 1.0}, "temperature": 2.0,
                       "divergence": "forward_kl", "beta": 0.5},
                      {"type": "hidden", "weight": 0.1, "teacher": "main", "layers": "uniform", "metric": "mse",
                       "projection": True}], student=Layout((16, 16)), teachers={"main": Layout((8, 8, 8, 8))})


def test_projections_are_checkpointed_apart_from_the_model_and_restored(tmp_path, monkeypatch):
    import ray.train

    from raydistill.distill import loop
    from raydistill.models import build_model

    net = build_model({"model": "mlp", "kwargs": {"hidden": 16}})
    crit = _criterion(0)
    opt = torch.optim.AdamW(list(net.parameters()) + list(crit.parameters()), lr=0.1)
    (sum(p.sum() for p in crit.parameters()) ** 2).backward()
    opt.step()  # trained projections, with optimizer state for them
    state = {"epoch": 1, "global_step": 7, "optimizer": opt.state_dict(), "criterion": crit.state_dict()}
    d = ck.save_checkpoint_dir(tmp_path / "run" / "checkpoint_000000", model=net, meta={"config_hash": "h", "epoch": 1},
                               state=state)
    from safetensors.torch import load_file

    assert not any("projection" in k for k in load_file(str(d / ck.MODEL_FILE)))  # the model's weights only
    fresh_net = build_model({"model": "mlp", "kwargs": {"hidden": 16}})
    fresh = _criterion(1)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.parameters(), crit.parameters()))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: types.SimpleNamespace(path=str(d)))
    spec = types.SimpleNamespace(progress_dir=str(tmp_path / "run"), config_hash="h", stage="student")
    got = loop.restore(spec, fresh_net, fresh)
    assert got["epoch"] == 1 and got["global_step"] == 7
    for (n, a), b in zip(crit.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(net.state_dict().values(), fresh_net.state_dict().values()):
        assert torch.equal(a, b)
    # the optimizer state of the projections comes back too (same parameter order: student, then criterion)
    opt2 = torch.optim.AdamW(list(fresh_net.parameters()) + list(fresh.parameters()), lr=0.1)
    opt2.load_state_dict(got["optimizer"])
    last = list(fresh.parameters())[-1]
    torch.testing.assert_close(opt2.state[last]["exp_avg"], opt.state[list(crit.parameters())[-1]]["exp_avg"])
