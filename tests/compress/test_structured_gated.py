"""Gated-MLP pruning (prune_structured on transformers Llama MLPs: gate_proj / up_proj rows and the
matching down_proj input columns): the pruned model equals the original with the removed intermediate
units zeroed at down_proj's input, in float64, for weight-norm and activation (Minitron) ranking, both
recomputed independently here; gradients; config.intermediate_size and the save_pretrained /
from_pretrained round trip; resize_structured; with attention heads in the same call; bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from _input_masks import masked_inputs
from raydistill.compress import prune_structured, resize_structured
from raydistill.compress.structured import gated_mlps

transformers = pytest.importorskip("transformers")  # a dependency of the LM task: present in the venv


def _llama(inter=48, layers=2, hidden=32, heads=4, mlp_bias=True, act="silu", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=61,
                      max_position_embeddings=32, use_cache=False, tie_word_embeddings=False, mlp_bias=mlp_bias,
                      hidden_act=act)
    return LlamaForCausalLM(cfg)


def _randomize(m, g):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _masked_logits(m, x, kept: dict[str, list[int]]):
    """Logits of the unpruned model with every intermediate unit not in ``kept[mlp]`` zeroed at
    down_proj's input."""
    masks = {}
    for name, units in kept.items():
        d = m.get_submodule(name).down_proj
        masks[d] = torch.zeros(d.in_features, dtype=torch.float64)
        masks[d][units] = 1
    with masked_inputs(masks):
        return m(x).logits


def _expected_kept(m, x, ratio, activation) -> dict[str, list[int]]:
    """Kept units per MLP, ranked here from first principles: activation = sqrt(mean over tokens of
    (act(gate) * up)^2), computed from the MLP's own input; weight norm = the Frobenius norm of the
    unit's gate/up rows (with biases) and its down_proj column."""
    out, inputs = {}, {}
    names = gated_mlps(m)
    if activation:
        hooks = [m.get_submodule(n).register_forward_pre_hook(
            lambda _m, inp, n=n: inputs.__setitem__(n, inp[0].detach())) for n in names]
        with torch.no_grad():
            m(x)
        for h in hooks:
            h.remove()
    for n in names:
        mlp = m.get_submodule(n)
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        with torch.no_grad():
            if activation:
                h = inputs[n].reshape(-1, g.in_features)
                prod = mlp.act_fn(h @ g.weight.T + g.bias) * (h @ u.weight.T + u.bias)
                s = prod.pow(2).mean(0).sqrt()
            else:
                s = (g.weight.pow(2).sum(1) + g.bias.pow(2) + u.weight.pow(2).sum(1) + u.bias.pow(2)
                     + d.weight.pow(2).sum(0)).sqrt()
        k = g.out_features - round(ratio * g.out_features)
        out[n] = sorted(torch.argsort(s, descending=True)[:k].tolist())
    return out


@pytest.mark.parametrize("ratio,act", [(0.5, "silu"), (0.25, "gelu"), (0.9, "relu")])
@pytest.mark.parametrize("activation", [False, True])
def test_pruned_model_equals_masked_units(seeded, ratio, act, activation):
    m = _llama(act=act).double().eval()
    _randomize(m, seeded)
    x = torch.randint(0, 61, (3, 12), generator=seeded)
    expect = _expected_kept(m, x, ratio, activation)
    ref = _masked_logits(m, x, expect).detach()
    orig = copy.deepcopy(m)
    rep = prune_structured(m, ratio, x if activation else None, exclude=["*.self_attn"])
    k = 48 - round(ratio * 48)
    assert {r["name"]: r["kept_units"] for r in rep.layers} == expect
    assert all(r["kind"] == "gated_mlp" and (r["units_before"], r["units_after"]) == (48, k) for r in rep.layers)
    assert rep.ranking == ("activation" if activation else "weight_norm")
    assert m.config.intermediate_size == k
    for n in gated_mlps(m):
        mlp = m.get_submodule(n)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (k, 32)
        assert mlp.gate_proj.bias.shape == (k,) and mlp.down_proj.weight.shape == (32, k)
        assert mlp.intermediate_size == k
    # attention untouched
    assert all(m.get_submodule(a).q_proj.out_features == 32 for a in ("model.layers.0.self_attn",))
    torch.testing.assert_close(m(x).logits, ref, rtol=0, atol=1e-10)
    x2 = torch.randint(0, 61, (2, 9), generator=seeded)  # inputs the ranking never saw
    torch.testing.assert_close(m(x2).logits, _masked_logits(orig, x2, expect), rtol=0, atol=1e-10)
    # the zeroed units did matter: the unmasked original differs
    assert (orig(x2).logits - m(x2).logits).abs().max() > 1e-3
    assert rep.widths == {f"{n}.gate_proj": k for n in expect}
    assert rep.params_before - rep.params_after == 2 * (3 * 32 * (48 - k) + 2 * (48 - k))


def test_gradients_match_the_masked_reference(seeded):
    m = _llama().double()
    _randomize(m, seeded)
    orig = copy.deepcopy(m)
    rep = prune_structured(m, 0.5, exclude=["*.self_attn"])
    kept = {r["name"]: r["kept_units"] for r in rep.layers}
    x = torch.randint(0, 61, (4, 10), generator=seeded)
    loss_p = m(x).logits.pow(2).mean()
    loss_r = _masked_logits(orig, x, kept).pow(2).mean()
    torch.testing.assert_close(loss_p, loss_r, rtol=1e-12, atol=0)
    loss_p.backward()
    loss_r.backward()
    for n, units in kept.items():
        p, r = m.get_submodule(n), orig.get_submodule(n)
        for proj in ("gate_proj", "up_proj"):
            torch.testing.assert_close(getattr(p, proj).weight.grad, getattr(r, proj).weight.grad[units],
                                       rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(p.down_proj.weight.grad, r.down_proj.weight.grad[:, units], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("activation", [False, True])
def test_save_pretrained_round_trip_and_resize_with_heads(tmp_path, seeded, activation):
    """MLP units and attention heads in one call: config has both new sizes; from_pretrained rebuilds the
    same logits; resize_structured + load_state_dict too."""
    from transformers import AutoModelForCausalLM

    m = _llama(mlp_bias=False).eval()
    _randomize(m, seeded)
    x = torch.randint(0, 61, (2, 16), generator=seeded)
    rep = prune_structured(m, 0.5, x if activation else None)
    assert sorted({r["kind"] for r in rep.layers}) == ["attention", "gated_mlp"]
    assert (m.config.intermediate_size, m.config.num_attention_heads) == (24, 2)
    m.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.intermediate_size == 24 and back.model.layers[1].mlp.down_proj.in_features == 24
    y = torch.randint(0, 61, (3, 11), generator=seeded)
    with torch.no_grad():
        torch.testing.assert_close(back(y).logits, m(y).logits, rtol=1e-6, atol=1e-6)
        fresh = resize_structured(_llama(mlp_bias=False), rep.widths)
        assert fresh.config.intermediate_size == 24
        fresh.load_state_dict(m.state_dict())
        assert torch.equal(fresh.eval()(y).logits, m(y).logits)


def test_bad_input():
    with pytest.raises(ValueError, match=r"ratio 0.99 would remove every unit of gated MLP 'model.layers.0.mlp' "
                                         r"\(48 intermediate units\)"):
        prune_structured(_llama(), 0.99, exclude=["*.self_attn"])
    m = _llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"select 1 of the model's 2 gated MLP modules"):
        prune_structured(m, 0.5, include=["model.layers.0.mlp"])
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # nothing changed on error
    m.config.intermediate_size = 40  # the modules no longer match the config
    with pytest.raises(ValueError, match=r"48 intermediate units but the LlamaConfig's intermediate_size is 40"):
        prune_structured(m, 0.5, exclude=["*.self_attn"])
    with pytest.raises(ValueError, match=r"width 60 for model.layers.0.mlp.gate_proj must be in \[1, 48\]"):
        resize_structured(_llama(), {"model.layers.0.mlp.gate_proj": 60})
    from raydistill.compress import prepare_qat

    m = _llama()
    prepare_qat(m, 8, include=["*.mlp.up_proj"])
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.up_proj' is a FakeQuantLinear, not a float "
                                         r"nn.Linear; prune_structured must run before"):
        prune_structured(m, 0.5)
