"""The parameter count of a pruned shape from the config alone (``config_params``: the model built on the
meta device) and the width solved for a parameter budget at a depth (``shape_for_params``: the axis mix a
shape search trades, depth against width at equal size)."""

from __future__ import annotations

import pytest
import torch

from raydistill.compress import config_params, prune_to_shape, shape_for_params

from _lm_models import VOCAB, randomize, tiny_lm


@pytest.mark.parametrize("tied", [False, True])
def test_config_params_is_the_pruned_models_count(seeded, tied):
    model = randomize(tiny_lm("llama", layers=4, hidden=32, heads=4, kv=2, inter=48, tied=tied), seeded)
    assert config_params(model) == sum(p.numel() for p in model.parameters())  # tied weights once
    target = {"num_hidden_layers": 3, "hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 20}
    before = config_params(model, target)
    rep = prune_to_shape(model, target, torch.randint(0, VOCAB, (2, 8), generator=seeded))
    assert before == rep.params_after == sum(p.numel() for p in model.parameters())


def test_width_solved_for_a_parameter_budget_at_each_depth():
    conf = tiny_lm("llama", layers=4, hidden=32, heads=4, kv=2, inter=48).config
    budget = config_params(conf) // 4  # one layer at full width has more
    shapes = {n: shape_for_params(conf, budget, n) for n in (1, 2, 3, 4)}
    for n, s in shapes.items():
        assert s["num_hidden_layers"] == n and s["hidden_size"] % s["num_attention_heads"] == 0
        assert s["num_attention_heads"] == 2 * s["num_key_value_heads"]  # the query heads per KV head kept
        # the nearest of every hidden size whose head count (scaled with it) divides it
        every = []
        for h in range(1, 33):
            kv = min(2, max(1, round(2 * h / 32)))
            if h % (2 * kv) == 0:
                every.append(config_params(conf, {"num_hidden_layers": n, "hidden_size": h, "num_attention_heads": 2 * kv,
                                                  "num_key_value_heads": kv, "intermediate_size": round(48 * h / 32)}))
        assert abs(config_params(conf, s) - budget) == min(abs(c - budget) for c in every), (n, s)
        assert abs(config_params(conf, s) - budget) <= 0.12 * budget  # the step of a head on this tiny model
    widths = [shapes[n]["hidden_size"] for n in (1, 2, 3, 4)]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]  # deeper: narrower
    assert shape_for_params(conf, 0.5, 2) == shape_for_params(conf, round(0.5 * config_params(conf)), 2)
    with pytest.raises(ValueError, match=r"student.init.params: .* out of reach at 4 layers"):
        shape_for_params(conf, 10, 4, key="student.init")
    with pytest.raises(ValueError, match=r"target.params: a float is the fraction .* got 1.5"):
        shape_for_params(conf, 1.5)
    with pytest.raises(ValueError, match=r"target.num_hidden_layers 5 is larger"):
        shape_for_params(conf, 0.5, 5)
