"""Width pruning (prune_to_shape: hidden size, heads, KV heads, intermediate size; with depth) of Llama-style
transformers LMs, float64.

The equivalence stated and checked here: the pruned model equals the ORIGINAL model in which
(1) the removed embedding channels are zeroed in every writer into the residual stream (embedding
columns, o_proj and down_proj output rows and biases) -- so the residual stream is exactly zero on them,
(2) every RMSNorm's weight is multiplied by sqrt(K/H) and its eps by K/H (K kept of H channels) -- which is
the same as taking the norm's mean square over the kept channels only, (3) removed heads / MLP units are
zeroed at o_proj's / down_proj's input and removed layers skipped. Without (2) it does not hold (checked).
Rankings are recomputed here from hooks on the unpruned model. transformers' RMSNorms compute in float32
whatever the dtype; they are patched to float64 here (``rmsnorm_in_float64``) so the equivalence is checked
to 1e-10; the bit-exact reload tests run the unpatched models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from _input_masks import masked_inputs
from _lm_models import VOCAB, cached_decode, decoder_list, logits, randomize, rmsnorm_in_float64, skipped, tiny_lm
from raydistill.compress import make_student_from_teacher, prune_structured, prune_to_shape

transformers = pytest.importorskip("transformers")  # a dependency of the LM task: present in the venv


@pytest.fixture
def f64_norms(monkeypatch):
    rmsnorm_in_float64(monkeypatch)


def _model(kind="llama", g=None, **kw):
    return randomize(tiny_lm(kind, **kw), g).double().eval()


def _norms(m, layers):
    return [n for i in layers for n in (m.model.layers[i].input_layernorm, m.model.layers[i].post_attention_layernorm)] \
        + [m.model.norm]


def _expected(m, x, kept_layers, hidden, heads, kv, inter):
    """Kept channels, query/KV heads per layer and MLP units per layer, ranked here from hooks."""
    acts = {}

    def rec(key, fn):
        return lambda _m, a, out=None: acts.__setitem__(key, fn(a[0] if out is None else out))
    hooks = [n.register_forward_hook(lambda _m, _a, out, k=k: acts.__setitem__(("n", k), out.abs().mean((0, 1))))
             for k, n in enumerate(_norms(m, kept_layers))]
    for i in kept_layers:
        layer = m.model.layers[i]
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, a, i=i: acts.__setitem__(("o", i), a[0].pow(2).mean((0, 1)))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, a, i=i: acts.__setitem__(("d", i), a[0].pow(2).mean((0, 1)))))
    logits(m, x)
    for h in hooks:
        h.remove()
    chan = sum(v for k, v in acts.items() if k[0] == "n")
    top = lambda s, k: sorted(torch.argsort(s, descending=True)[:k].tolist())  # noqa: E731
    h0, kv0 = m.config.num_attention_heads, m.config.num_key_value_heads
    hd, g0 = getattr(m.config, "head_dim", None) or m.config.hidden_size // h0, h0 // kv0
    out = {"channels": top(chan, hidden), "heads": {}, "units": {}}
    for i in kept_layers:
        per_q = acts[("o", i)].reshape(h0, hd).sum(1).reshape(kv0, g0)
        groups = top(per_q.sum(1), kv)
        out["heads"][i] = {"query": [grp * g0 + j for grp in groups for j in top(per_q[grp], heads // kv)],
                           "kv": groups}
        out["units"][i] = top(acts[("d", i)], inter)
    return out


def reference(orig, rep, *, renorm=True):
    """The unpruned model edited as the module docstring says (a copy), and the forward context that
    masks its removed heads / units and skips its removed layers."""
    m = copy.deepcopy(orig)
    big, small = rep.shape_before["hidden_size"], rep.shape_after["hidden_size"]
    drop = torch.ones(big, dtype=torch.bool)
    drop[rep.kept_channels or list(range(big))] = False
    kept_layers = [i for i in range(rep.shape_before["num_hidden_layers"]) if i not in rep.removed_layers]
    hd = rep.shape_before["head_dim"]
    masks = {}
    with torch.no_grad():
        m.model.embed_tokens.weight[:, drop] = 0
        for i in kept_layers:
            layer = m.model.layers[i]
            for w in (layer.self_attn.o_proj, layer.mlp.down_proj):
                w.weight[drop] = 0
                if w.bias is not None:
                    w.bias[drop] = 0
            if i in rep.kept_heads:
                o = layer.self_attn.o_proj
                masks[o] = torch.zeros(o.in_features, dtype=torch.float64)
                for h in rep.kept_heads[i]["query"]:
                    masks[o][h * hd:(h + 1) * hd] = 1
            if i in rep.kept_units:
                d = layer.mlp.down_proj
                masks[d] = torch.zeros(d.in_features, dtype=torch.float64)
                masks[d][rep.kept_units[i]] = 1
        if renorm:
            for n in _norms(m, kept_layers):
                n.weight.mul_(math.sqrt(small / big))
                n.variance_epsilon *= small / big

    def run(x):
        with masked_inputs(masks), skipped(m, rep.removed_layers):
            return logits(m, x)
    return run


@pytest.mark.parametrize("kind,tied,bias", [("llama", False, True), ("llama", True, False), ("qwen2", False, False),
                                            ("mistral", True, False)])
def test_hidden_size_pruning_equals_zeroed_channels_with_norms_over_kept(seeded, f64_norms, kind, tied, bias):
    kw = {"bias": bias} if kind == "llama" else {}
    m = _model(kind, seeded, layers=2, tied=tied, **kw)
    m.config.rms_norm_eps = 1e-2  # a large eps, so that eps's rescaling in the statement is tested, not hidden
    for mod in m.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 0.05
    orig = copy.deepcopy(m)
    x = torch.randint(0, VOCAB, (4, 12), generator=seeded)
    rep = prune_to_shape(m, {"hidden_size": 20}, x)
    assert rep.kept_channels == _expected(orig, x, [0, 1], 20, 4, 4, 48)["channels"]
    assert m.config.hidden_size == 20 and m.config.head_dim == 8  # the attention keeps 4 heads of 8
    assert m.model.embed_tokens.weight.shape == (VOCAB, 20) and m.lm_head.weight.shape == (VOCAB, 20)
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied
    a = m.model.layers[0].self_attn
    assert a.q_proj.weight.shape == (32, 20) and a.o_proj.weight.shape == (20, 32)
    x2 = torch.randint(0, VOCAB, (3, 10), generator=seeded)  # inputs the ranking never saw
    torch.testing.assert_close(logits(m, x2), reference(orig, rep)(x2), rtol=0, atol=1e-10)
    # the norm part of the statement is needed: zeroing the channels alone is not the pruned model
    assert not torch.allclose(logits(m, x2), reference(orig, rep, renorm=False)(x2), atol=1e-3)


@pytest.mark.parametrize("heads,kv,target", [
    (8, 4, {"num_attention_heads": 4, "num_key_value_heads": 2}),   # whole KV groups
    (8, 4, {"num_attention_heads": 4}),                             # query heads within each group (KV kept)
    (8, 2, {"num_attention_heads": 2, "num_key_value_heads": 1}),   # KV groups and query heads
    (4, 4, {"num_attention_heads": 2}),                             # multi-head stays multi-head
])
def test_full_shape_equals_reference(seeded, f64_norms, heads, kv, target):
    m = _model("llama", seeded, layers=4, hidden=32, heads=heads, kv=kv, bias=True)
    orig = copy.deepcopy(m)
    x = torch.randint(0, VOCAB, (4, 12), generator=seeded)
    shape = {"num_hidden_layers": 3, "hidden_size": 16, "intermediate_size": 20, **target}
    rep = prune_to_shape(m, shape, x)
    h2, kv2 = rep.shape_after["num_attention_heads"], rep.shape_after["num_key_value_heads"]
    assert (h2, kv2) == (target["num_attention_heads"], target.get("num_key_value_heads", kv if kv < heads else h2))
    kept_layers = [i for i in range(4) if i not in rep.removed_layers]
    exp = _expected(orig, x, kept_layers, 16, h2, kv2, 20)
    assert rep.kept_channels == exp["channels"] and rep.kept_units == exp["units"] and rep.kept_heads == exp["heads"]
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.head_dim) == (3, 16, h2, kv2, 20, 32 // heads)
    x2 = torch.randint(0, VOCAB, (3, 10), generator=seeded)
    torch.testing.assert_close(logits(m, x2), reference(orig, rep)(x2), rtol=0, atol=1e-10)
    assert rep.params_after == sum(p.numel() for p in m.parameters()) < rep.params_before


def test_random_width_ranking(seeded, f64_norms):
    m = _model("llama", seeded, layers=2, heads=4)
    x = torch.randint(0, VOCAB, (3, 10), generator=seeded)
    shape = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 20}
    reps = [prune_to_shape(copy.deepcopy(m), shape, x, width_ranking="random", seed=s) for s in (0, 0, 1)]
    assert reps[0].kept_channels == reps[1].kept_channels and reps[0].kept_units == reps[1].kept_units
    assert reps[0].kept_channels != reps[2].kept_channels
    act = prune_to_shape(copy.deepcopy(m), shape, x)
    assert act.kept_channels != reps[0].kept_channels
    m2 = copy.deepcopy(m)
    rep = prune_to_shape(m2, shape, x, width_ranking="random", seed=5)
    torch.testing.assert_close(logits(m2, x), reference(m, rep)(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_pretrained_round_trip_is_bit_exact(seeded, tmp_path, tied, dtype):
    m = randomize(tiny_lm("llama", layers=3, heads=4, kv=2, tied=tied), seeded).to(dtype).eval()
    x = torch.randint(0, VOCAB, (3, 12), generator=seeded)
    prune_to_shape(m, {"num_hidden_layers": 2, "hidden_size": 0.5, "num_attention_heads": 2, "num_key_value_heads": 1,
                       "intermediate_size": 0.5}, x)
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    c = back.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.head_dim) == (2, 16, 2, 1, 24, 8)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    sd, sb = m.state_dict(), back.state_dict()
    assert sd.keys() == sb.keys() and all(torch.equal(sd[k], sb[k]) for k in sd)
    assert torch.equal(logits(back, x), logits(m, x))


def test_kv_cache_decoding_after_width_pruning(seeded):
    m = _model("llama", seeded, layers=3, heads=4, kv=2)
    x = torch.randint(0, VOCAB, (2, 9), generator=seeded)
    prune_to_shape(m, {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                       "intermediate_size": 24}, x)
    torch.testing.assert_close(cached_decode(m, x, 6), logits(m, x), rtol=1e-9, atol=1e-10)


def test_student_from_teacher_config(seeded, f64_norms):
    """A student config (lm_default's pattern: half the width, same head count, so half the head size) as
    the target: the teacher's head size is kept and the student's attention width reached with fewer
    heads; the teacher is left unchanged."""
    teacher = _model("llama", seeded, layers=4, hidden=64, heads=4, inter=96)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_cfg = tiny_lm("llama", layers=2, hidden=32, heads=4, inter=40).config.to_dict()
    x = torch.randint(0, VOCAB, (3, 10), generator=seeded)
    student, rep = make_student_from_teacher(teacher, student_cfg, x)
    assert rep.shape_after == {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                               "num_key_value_heads": 2, "intermediate_size": 40, "head_dim": 16}
    assert rep.notes and "4 heads x head_dim 8" in rep.notes[0]
    ref_student = tiny_lm("llama", layers=2, hidden=32, heads=4, inter=40)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in ref_student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    torch.testing.assert_close(logits(student, x), reference(teacher, rep)(x), rtol=0, atol=1e-10)


def test_prune_structured_hidden_size(seeded):
    m = _model("llama", seeded, layers=3)
    orig = copy.deepcopy(m)
    x = torch.randint(0, VOCAB, (3, 10), generator=seeded)
    rep = prune_structured(m, 0.0, x, hidden_size=16)
    (entry,) = [r for r in rep.layers if r["kind"] == "hidden"]
    assert entry["kept_channels"] == _expected(orig, x, [0, 1, 2], 16, 4, 4, 48)["channels"]
    assert m.config.hidden_size == 16 and rep.params_after < rep.params_before


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,match", [
    ({"hidden_size": 48}, r"target.hidden_size 48 is larger than the model's 32"),
    ({"num_attention_heads": 8}, r"target.num_attention_heads 8 is larger than the model's 4"),
    ({"num_key_value_heads": 4}, r"target.num_key_value_heads 4 is larger than the model's 2"),
    ({"intermediate_size": 64}, r"target.intermediate_size 64 is larger than the model's 48"),
    ({"hidden_size": 30}, r"target.num_attention_heads 4 does not divide target.hidden_size 30"),
    ({"num_attention_heads": 3, "num_key_value_heads": 2}, r"target.num_key_value_heads 2 does not divide "
                                                            r"target.num_attention_heads 3"),
    ({"num_attention_heads": 4, "num_key_value_heads": 1}, r"4 query heads per KV head, more than the model's 2"),
    ({"head_dim": 4}, r"target.head_dim 4 differs from the model's 8"),
    ({"hidden_size": True}, r"target.hidden_size must be an int"),
    ({"hidden_size": 0.0}, r"target.hidden_size: a float is the fraction kept"),
])
def test_bad_width_targets(seeded, target, match):
    m = _model("llama", seeded, layers=2, heads=4, kv=2)
    x = torch.randint(0, VOCAB, (2, 8), generator=seeded)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_to_shape(m, target, x)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # nothing changed


def test_layouts_that_cannot_be_width_pruned(seeded):
    x = torch.randint(0, VOCAB, (2, 8), generator=seeded)
    with pytest.raises(ValueError, match=r"target.hidden_size: width pruning .* supports model_type llama"):
        prune_to_shape(tiny_lm("gpt2"), {"hidden_size": 16}, x)
    with pytest.raises(ValueError, match=r"target.intermediate_size: the model.s GPT2Config has no intermediate_size"):
        prune_to_shape(tiny_lm("gpt2"), {"intermediate_size": 16}, x)
    with pytest.raises(ValueError, match=r"^hidden_size: width pruning .* supports model_type llama, mistral, qwen2, not .gpt2."):
        prune_structured(tiny_lm("gpt2"), 0.0, x, hidden_size=16)
    m = tiny_lm("llama", layers=2)
    m.model.layers[1].adapter = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"decoder layer layers.1 has unknown parts \['adapter'\]"):
        prune_to_shape(m, {"hidden_size": 16}, x)
    m = tiny_lm("llama", layers=2)
    from raydistill.compress import QuantizedLinear

    m.model.layers[0].mlp.up_proj = QuantizedLinear.from_linear(m.model.layers[0].mlp.up_proj)
    with pytest.raises(ValueError, match="QuantizedLinear projections"):
        prune_to_shape(m, {"hidden_size": 16}, x)
    assert decoder_list(m)[0].mlp.gate_proj.in_features == 32


def test_target_checked_from_the_teacher_config_alone():
    """What a pipeline checks before Ray starts: a teacher config dict (no model built) and a student
    config as the target, errors named under the pipeline's key."""
    from raydistill.compress.prune_shape import check_prune_target, student_target

    teacher = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}
    student = teacher | {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2}
    target, notes = student_target(teacher, student)
    assert target == {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 344,
                      "num_attention_heads": 2, "num_key_value_heads": 2} and len(notes) == 1
    assert check_prune_target(teacher, target, key="student.init")["head_dim"] == 64
    with pytest.raises(ValueError, match=r"student.init.hidden_size 512 is larger than the model's 256"):
        check_prune_target(teacher, {"hidden_size": 512}, key="student.init")
    with pytest.raises(ValueError, match=r"student.init.num_attention_heads 3 does not divide student.init.hidden_size"):
        check_prune_target(teacher, {"num_attention_heads": 3, "hidden_size": 128}, key="student.init")
    gpt2 = {"model_type": "gpt2", "n_layer": 4, "n_embd": 64, "n_head": 4}
    assert check_prune_target(gpt2, {"num_hidden_layers": 2})["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match=r"student.init.hidden_size: width pruning .* not 'gpt2'"):
        check_prune_target(gpt2, {"hidden_size": 32}, key="student.init")
    with pytest.raises(ValueError, match=r"depth pruning supports model_type .* not 'opt'"):
        check_prune_target({"model_type": "opt", "num_hidden_layers": 4, "hidden_size": 16,
                            "num_attention_heads": 2}, {"num_hidden_layers": 2})
