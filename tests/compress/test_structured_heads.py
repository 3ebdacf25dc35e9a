"""Attention-head pruning (prune_structured on transformers Llama models): the pruned model equals the
original with the removed heads' outputs zeroed (o_proj input columns masked; the gated MLPs excluded:
tests/compress/test_structured_gated.py covers them), in float64, for plain
multi-head attention and grouped KV heads; rankings recomputed independently; gradients; config and
save_pretrained / from_pretrained round trip; resize_structured; bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _input_masks import masked_inputs
from raydistill.compress import prune_structured, resize_structured
from raydistill.compress.structured import attention_modules

transformers = pytest.importorskip("transformers")  # a dependency of the LM task: present in the venv


def _llama(heads=4, kv_heads=4, layers=2, hidden=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=61, max_position_embeddings=32, use_cache=False,
                      tie_word_embeddings=False, attention_bias=True)
    return LlamaForCausalLM(cfg)


def _randomize(m, g):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _masked_logits(m, x, kept: dict[str, list[int]], head_dim: int, grad: bool = False):
    """Logits of the unpruned model with every head not in ``kept[attn]`` zeroed at o_proj's input."""
    masks = {}
    for a, heads in kept.items():
        o = m.get_submodule(a).o_proj
        masks[o] = torch.zeros(o.in_features, dtype=torch.float64)
        for h in heads:
            masks[o][h * head_dim:(h + 1) * head_dim] = 1
    with masked_inputs(masks):
        return m(x).logits


def _expected_kept(m, x, heads, kv, hd, unit, ratio, activation):
    """The kept query heads per attention module, ranked here from first principles."""
    g = heads // kv
    out = {}
    energy = {}
    if activation:
        hooks = [mod.o_proj.register_forward_pre_hook(
            lambda _m, inp, n=n: energy.__setitem__(n, inp[0].detach().reshape(-1, heads, hd).pow(2).sum(2).mean(0)))
            for n, mod in m.named_modules() if n in attention_modules(m)]
        with torch.no_grad():
            m(x)
        for h in hooks:
            h.remove()
    for n in attention_modules(m):
        a = dict(m.named_modules())[n]
        if activation:
            per_q = energy[n]
        else:
            per_q = torch.stack([a.q_proj.weight[i * hd:(i + 1) * hd].pow(2).sum() + a.q_proj.bias[i * hd:(i + 1) * hd].pow(2).sum()
                                 + a.o_proj.weight[:, i * hd:(i + 1) * hd].pow(2).sum() for i in range(heads)]).detach()
        per_q = per_q.reshape(kv, g)
        if unit == "kv_group":
            s = per_q.sum(1)
            if not activation:
                s = s + torch.stack([sum(p.weight[j * hd:(j + 1) * hd].pow(2).sum() + p.bias[j * hd:(j + 1) * hd].pow(2).sum()
                                         for p in (a.k_proj, a.v_proj)) for j in range(kv)]).detach()
            keep = sorted(torch.argsort(s, descending=True)[:kv - round(ratio * kv)].tolist())
            out[n] = [grp * g + j for grp in keep for j in range(g)]
        else:
            per = g - round(ratio * g)
            out[n] = [grp * g + j for grp in range(kv) for j in sorted(torch.argsort(per_q[grp], descending=True)[:per].tolist())]
    return out


@pytest.mark.parametrize("heads,kv,unit,ratio", [(4, 4, "kv_group", 0.5), (6, 6, "kv_group", 0.34),
                                                 (4, 2, "kv_group", 0.5), (8, 2, "query", 0.5),
                                                 (6, 2, "query", 0.34), (8, 4, "kv_group", 0.25)])
@pytest.mark.parametrize("activation", [False, True])
def test_pruned_model_equals_masked_heads(seeded, heads, kv, unit, ratio, activation):
    hidden = 8 * heads
    m = _llama(heads, kv, hidden=hidden).double().eval()
    _randomize(m, seeded)
    hd = hidden // heads
    x = torch.randint(0, 61, (3, 12), generator=seeded)
    expect = _expected_kept(m, x, heads, kv, hd, unit, ratio, activation)
    ref = _masked_logits(m, x, expect, hd).detach()
    orig = copy.deepcopy(m)
    rep = prune_structured(m, ratio, x if activation else None, head_unit=unit, exclude=["*.mlp"])
    got = {r["name"]: r["kept_heads"] for r in rep.layers}
    assert got == expect
    h2 = len(next(iter(expect.values())))
    kv2 = kv - round(ratio * kv) if unit == "kv_group" else kv
    assert (m.config.num_attention_heads, m.config.num_key_value_heads, m.config.head_dim) == (h2, kv2, hd)
    for a in attention_modules(m):
        mod = m.get_submodule(a)
        assert mod.q_proj.weight.shape == (h2 * hd, hidden) and mod.o_proj.weight.shape == (hidden, h2 * hd)
        assert mod.k_proj.weight.shape == (kv2 * hd, hidden) and mod.num_key_value_groups == h2 // kv2
    torch.testing.assert_close(m(x).logits, ref, rtol=0, atol=1e-10)
    x2 = torch.randint(0, 61, (2, 9), generator=seeded)  # inputs the ranking never saw
    torch.testing.assert_close(m(x2).logits, _masked_logits(orig, x2, expect, hd), rtol=0, atol=1e-10)
    assert rep.params_after < rep.params_before
    assert rep.widths == {k: v for a in expect for k, v in ((f"{a}.q_proj", h2 * hd), (f"{a}.k_proj", kv2 * hd))}


def test_fresh_inputs_and_gradients_match_the_masked_reference(seeded):
    m = _llama(4, 2, hidden=32).double()
    _randomize(m, seeded)
    orig = _llama(4, 2, hidden=32).double()
    orig.load_state_dict(m.state_dict())
    rep = prune_structured(m, 0.5, exclude=["*.mlp"])  # one KV group of two (two query heads) per layer
    kept = {r["name"]: r["kept_heads"] for r in rep.layers}
    x = torch.randint(0, 61, (4, 10), generator=seeded)  # inputs the ranking never saw
    loss_p = m(x).logits.pow(2).mean()
    loss_r = _masked_logits(orig, x, kept, 8).pow(2).mean()
    torch.testing.assert_close(loss_p, loss_r, rtol=1e-12, atol=0)
    loss_p.backward()
    loss_r.backward()
    for a, heads in kept.items():
        rows = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in heads])
        p, r = m.get_submodule(a), orig.get_submodule(a)
        torch.testing.assert_close(p.q_proj.weight.grad, r.q_proj.weight.grad[rows], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(p.o_proj.weight.grad, r.o_proj.weight.grad[:, rows], rtol=1e-9, atol=1e-12)
        kv_rows = torch.cat([torch.arange(h // 2 * 8, (h // 2 + 1) * 8) for h in heads[::2]])
        torch.testing.assert_close(p.v_proj.weight.grad, r.v_proj.weight.grad[kv_rows], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m.lm_head.weight.grad, orig.lm_head.weight.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kv,unit", [(4, "kv_group"), (2, "query")])
def test_save_pretrained_round_trip_and_resize(tmp_path, seeded, kv, unit):
    from transformers import AutoModelForCausalLM

    m = _llama(4, kv).eval()
    _randomize(m, seeded)
    x = torch.randint(0, 61, (2, 16), generator=seeded)
    rep = prune_structured(m, 0.5, x, head_unit=unit)  # heads and gated MLP units
    m.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_attention_heads == 2 and back.config.num_key_value_heads == 2
    assert back.config.intermediate_size == 24
    y = torch.randint(0, 61, (3, 11), generator=seeded)
    with torch.no_grad():
        torch.testing.assert_close(back(y).logits, m(y).logits, rtol=1e-6, atol=1e-6)
        fresh = resize_structured(_llama(4, kv), rep.widths)
        fresh.load_state_dict(m.state_dict())
        assert torch.equal(fresh.eval()(y).logits, m(y).logits)
        assert fresh.config.num_attention_heads == m.config.num_attention_heads


def test_bad_input():
    with pytest.raises(ValueError, match=r"ratio 0.9 would remove every head of attention module 'model.layers.0.self_attn'"):
        prune_structured(_llama(4, 4), 0.9)
    with pytest.raises(ValueError, match="head_unit='query' removes query heads only"):
        prune_structured(_llama(4, 1), 0.6)  # one KV group: kv_group pruning would remove it
    assert prune_structured(_llama(4, 1), 0.5, exclude=["*.mlp"]).layers[0]["units_after"] == 4  # round(0.5 * 1) = 0
    with pytest.raises(ValueError, match="would remove every head"):
        prune_structured(_llama(4, 4), 0.6, head_unit="query")  # one query head per KV head
    with pytest.raises(ValueError, match="head_unit must be one of"):
        prune_structured(_llama(), 0.5, head_unit="heads")
    with pytest.raises(ValueError, match="select 1 of the model's 2 attention modules"):
        prune_structured(_llama(), 0.5, include=["model.layers.0.self_attn"])
    m = _llama()
    m.model.layers[0].self_attn.q_proj = nn.Identity()
    m.model.layers[0].self_attn.q_proj.in_features = m.model.layers[0].self_attn.q_proj.out_features = 32
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' is a Identity, not a float"):
        prune_structured(m, 0.5)
    with pytest.raises(ValueError, match="must be whole heads of 8"):
        resize_structured(_llama(), {"model.layers.0.self_attn.q_proj": 12})


def test_gpt2_heads_are_refused_naming_the_rule():
    """GPT-2 (fused c_attn Conv1D): the installed transformers derives head_dim = n_embd // n_head and has no
    head_dim key, so a GPT-2 with fewer (same-size) heads cannot be represented; prune_structured refuses,
    naming the module and the rule, before changing anything; excluding the attention leaves nothing to
    prune (GPT-2's MLP is Conv1D, not handled)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # the premise, checked against the installed transformers: a head_dim in the config is ignored
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16)
    cfg.head_dim = 4
    m = GPT2LMHeadModel(cfg)
    attn = m.transformer.h[0].attn
    assert attn.head_dim == 8 and attn.c_attn.weight.shape == (32, 96) and attn.c_proj.weight.shape == (32, 32)
    assert "head_dim" not in GPT2Config().to_dict()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"attention module 'transformer.h.0.attn' is GPT-2 style \(a fused c_attn\): "
                                         r"fewer heads cannot be represented, because transformers' GPT-2 derives "
                                         r"head_dim = n_embd // n_head"):
        prune_structured(m, 0.5)
    with pytest.raises(ValueError, match=r"'transformer.h.1.attn' is GPT-2 style"):
        prune_structured(m, 0.5, exclude=["transformer.h.0.attn"])
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="no Linear -> activation -> Linear pair, no gated MLP and no q/k/v/o"):
        prune_structured(m, 0.5, exclude=["*.attn"])


def test_gpt2_student_in_a_config_fails_before_training():
    from raydistill.config import load_config
    from raydistill.distill.steps import check_recipe
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "tune_configs" / "lm_tiny.yaml", [
        "student.kwargs.config={model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2, n_positions: 64}",
        "compression=[{prune_structured: {ratio: 0.5}}]"])
    with pytest.raises(ValueError, match=r"compression\.structured: .*'transformer.h.0.attn' is GPT-2 style.*"
                                         r"head_dim = n_embd // n_head"):
        check_recipe(cfg)
