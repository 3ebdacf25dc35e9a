"""Depth pruning (prune_to_shape / prune_structured with num_layers) of transformers decoder LMs: the pruned
model equals the original with the removed layers skipped, exactly (float64), for Llama, Qwen2, Mistral
and GPT-2; the rankings (block importance, perplexity increase, random; individual and contiguous) are
recomputed here from the model's own outputs; layer_idx / KV cache, per-layer config lists,
save_pretrained / from_pretrained bit-exact; pad positions left out of the scores; bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from _lm_models import VOCAB, cached_decode, decoder_list, logits, randomize, skipped, tiny_lm
from raydistill.compress import prune_structured, prune_to_shape

transformers = pytest.importorskip("transformers")  # a dependency of the LM task: present in the venv


def _model(kind, g, **kw):
    return randomize(tiny_lm(kind, **kw), g).double().eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("ranking,contiguous", [("block_importance", False), ("perplexity", True),
                                                ("random", False), ("block_importance", True)])
def test_pruned_depth_equals_original_with_layers_skipped(seeded, kind, ranking, contiguous):
    m = _model(kind, seeded, layers=5)
    orig = copy.deepcopy(m)
    x = torch.randint(0, VOCAB, (4, 12), generator=seeded)
    rep = prune_to_shape(m, {"num_hidden_layers": 3}, x, depth_ranking=ranking, contiguous=contiguous, seed=7)
    removed = rep.removed_layers
    assert len(removed) == 2 and rep.shape_after["num_hidden_layers"] == 3
    if contiguous:
        assert removed[1] == removed[0] + 1
    assert m.config.num_hidden_layers == 3 and len(decoder_list(m)) == 3
    x2 = torch.randint(0, VOCAB, (3, 10), generator=seeded)  # inputs the ranking never saw
    with skipped(orig, removed):
        ref = logits(orig, x2)
    torch.testing.assert_close(logits(m, x2), ref, rtol=0, atol=1e-10)
    kept = [i for i in range(5) if i not in removed]
    for j, layer in enumerate(decoder_list(m)):  # the same layer objects, renumbered
        assert layer is decoder_list(orig)[kept[j]] or torch.equal(
            next(layer.parameters()), next(decoder_list(orig)[kept[j]].parameters()))
        attn = layer.attn if kind == "gpt2" else layer.self_attn
        assert attn.layer_idx == j
    assert rep.params_after < rep.params_before


def _bi_reference(m, x):
    """Per layer: mean over tokens of 1 - cos(layer input, layer output), from output_hidden_states of the
    model with its final norm taken out (so the last entry is the last layer's output)."""
    m2 = copy.deepcopy(m)
    m2.model.norm = torch.nn.Identity()
    with torch.no_grad():
        hs = m2(input_ids=x, output_hidden_states=True).hidden_states
    return [float((1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)).mean())
            for i in range(len(hs) - 1)], hs


def _loss(m, x):
    """Mean next-token cross-entropy, float64."""
    with torch.no_grad():
        lg = m(input_ids=x).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1)))


def _loss_without(m, x, drop):
    """The loss of a copy with the decoder layers ``drop`` deleted from its layer list."""
    m2 = copy.deepcopy(m)
    m2.model.layers = torch.nn.ModuleList([l for i, l in enumerate(m2.model.layers) if i not in drop])
    m2.config.num_hidden_layers = len(m2.model.layers)
    return _loss(m2, x)


def test_block_importance_ranking_recomputed(seeded):
    m = _model("llama", seeded, layers=5)
    x = torch.randint(0, VOCAB, (5, 12), generator=seeded)
    bi, hs = _bi_reference(m, x)
    rep = prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 3}, x, batch_size=2)  # chunks of 2, 2, 1 blocks
    torch.testing.assert_close(torch.tensor(rep.layer_scores["scores"]), torch.tensor(bi), rtol=1e-9, atol=1e-12)
    assert rep.removed_layers == sorted(torch.argsort(torch.tensor(bi))[:2].tolist())
    # contiguous: a window's score is measured between its first input and its last output
    rep = prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 3}, x, contiguous=True)
    win = [float((1 - torch.nn.functional.cosine_similarity(hs[s], hs[s + 2], dim=-1)).mean()) for s in range(4)]
    torch.testing.assert_close(torch.tensor(rep.layer_scores["scores"]), torch.tensor(win), rtol=1e-9, atol=1e-12)
    best = int(torch.argmin(torch.tensor(win)))
    assert rep.removed_layers == [best, best + 1]


def test_perplexity_ranking_recomputed(seeded):
    m = _model("llama", seeded, layers=4)
    x = torch.randint(0, VOCAB, (3, 10), generator=seeded)
    full = _loss(m, x)
    inc = [_loss_without(m, x, {i}) - full for i in range(4)]
    rep = prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 2}, x, depth_ranking="perplexity")
    torch.testing.assert_close(torch.tensor(rep.layer_scores["scores"]), torch.tensor(inc), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rep.layer_scores["nll"], full, rtol=1e-12, atol=0)
    assert rep.removed_layers == sorted(torch.argsort(torch.tensor(inc))[:2].tolist())
    rep = prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 2}, x, depth_ranking="perplexity", contiguous=True)
    win = [_loss_without(m, x, {s, s + 1}) - full for s in range(3)]
    torch.testing.assert_close(torch.tensor(rep.layer_scores["scores"]), torch.tensor(win), rtol=1e-9, atol=1e-12)


def test_random_ranking_follows_the_seed(seeded):
    m = _model("llama", seeded, layers=6)
    x = torch.randint(0, VOCAB, (2, 8), generator=seeded)
    picks = {s: prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 3}, x, depth_ranking="random",
                               seed=s).removed_layers for s in range(6)}
    again = prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 3}, x, depth_ranking="random", seed=3)
    assert again.removed_layers == picks[3]
    assert len({tuple(v) for v in picks.values()}) > 1  # not one fixed choice


def test_pad_positions_are_left_out(seeded):
    m = _model("llama", seeded, layers=4)
    x = torch.randint(1, VOCAB, (3, 9), generator=seeded)  # id 0 is the pad id here
    padded = torch.cat([x, torch.zeros(3, 4, dtype=x.dtype)], 1)  # causal: pads after a block change nothing before
    for ranking in ("block_importance", "perplexity"):
        a = prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 2}, x, depth_ranking=ranking)
        b = prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 2}, padded, depth_ranking=ranking, pad_id=0)
        c = prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 2}, padded, depth_ranking=ranking)
        torch.testing.assert_close(torch.tensor(b.layer_scores["scores"]), torch.tensor(a.layer_scores["scores"]),
                                   rtol=1e-9, atol=1e-12)
        assert not torch.allclose(torch.tensor(c.layer_scores["scores"]), torch.tensor(a.layer_scores["scores"]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_kv_cache_decoding_after_depth_pruning(seeded, kind):
    """Incremental decoding with a KV cache equals the full forward: the kept layers' layer_idx index a
    cache of the new depth."""
    m = _model(kind, seeded, layers=4)
    x = torch.randint(0, VOCAB, (2, 8), generator=seeded)
    rep = prune_to_shape(m, {"num_hidden_layers": 2}, x, depth_ranking="random", seed=3)
    assert rep.removed_layers == [0, 3]  # the kept layers 1, 2 are renumbered 0, 1 (else the cache breaks)
    full = logits(m, x)
    torch.testing.assert_close(cached_decode(m, x, 5), full, rtol=1e-9, atol=1e-10)


def test_per_layer_config_lists_follow_the_layers(seeded, tmp_path):
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    m = _model("qwen2", seeded, layers=5, layer_types=types, use_sliding_window=True, sliding_window=4)
    x = torch.randint(0, VOCAB, (3, 12), generator=seeded)
    orig = copy.deepcopy(m)
    rep = prune_to_shape(m, {"num_hidden_layers": 2}, x)
    kept = [i for i in range(5) if i not in rep.removed_layers]
    assert m.config.layer_types == [types[i] for i in kept]
    with skipped(orig, rep.removed_layers):
        torch.testing.assert_close(logits(m, x), logits(orig, x), rtol=0, atol=1e-10)
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.layer_types == [types[i] for i in kept]
    assert torch.equal(logits(back, x), logits(m, x))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_pretrained_round_trip_is_bit_exact(seeded, tmp_path, kind, dtype):
    m = randomize(tiny_lm(kind, layers=4), seeded).to(dtype).eval()
    x = torch.randint(0, VOCAB, (3, 12), generator=seeded)
    prune_to_shape(m, {"num_hidden_layers": 0.5}, x)  # a fraction: half the layers
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert back.config.num_hidden_layers == 2
    sd, sb = m.state_dict(), back.state_dict()
    assert sd.keys() == sb.keys() and all(torch.equal(sd[k], sb[k]) for k in sd)
    assert torch.equal(logits(back, x), logits(m, x))


def test_prune_structured_num_layers(seeded):
    """prune_structured(num_layers=...) with ratio=0 removes layers only, ranked like prune_to_shape; with a
    ratio its head / MLP entries and widths follow the kept layers' new indices."""
    m = _model("llama", seeded, layers=4)
    x = torch.randint(0, VOCAB, (3, 10), generator=seeded)
    ref = prune_to_shape(copy.deepcopy(m), {"num_hidden_layers": 2}, x)
    m1 = copy.deepcopy(m)
    rep = prune_structured(m1, 0.0, x, num_layers=2)
    (entry,) = [r for r in rep.layers if r["kind"] == "decoder_layers"]
    assert entry["removed_layers"] == ref.removed_layers and m1.config.num_hidden_layers == 2
    rep = prune_structured(m, 0.5, x, num_layers=2)
    assert sorted(rep.widths) == sorted(f"model.layers.{j}.{p}" for j in range(2)
                                        for p in ("mlp.gate_proj", "self_attn.q_proj", "self_attn.k_proj"))
    assert {r["name"] for r in rep.layers if r["kind"] == "attention"} == {"model.layers.0.self_attn",
                                                                           "model.layers.1.self_attn"}


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_depth_input(seeded):
    m = _model("llama", seeded, layers=4)
    x = torch.randint(0, VOCAB, (2, 8), generator=seeded)
    with pytest.raises(ValueError, match=r"target.num_hidden_layers 5 is larger than the model's 4"):
        prune_to_shape(m, {"num_hidden_layers": 5}, x)
    with pytest.raises(ValueError, match=r"target.num_hidden_layers must be at least 1"):
        prune_to_shape(m, {"num_hidden_layers": 0}, x)
    with pytest.raises(ValueError, match=r"target.num_hidden_layers: a float is the fraction kept"):
        prune_to_shape(m, {"num_hidden_layers": 1.5}, x)
    with pytest.raises(ValueError, match=r"target: unknown key\(s\) \['layers'\]"):
        prune_to_shape(m, {"layers": 2}, x)
    with pytest.raises(ValueError, match="depth_ranking must be one of"):
        prune_to_shape(m, {"num_hidden_layers": 2}, x, depth_ranking="cosine")
    with pytest.raises(ValueError, match="contiguous must be a bool"):
        prune_to_shape(m, {"num_hidden_layers": 2}, x, contiguous="yes")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        prune_to_shape(m, {"num_hidden_layers": 2}, x, batch_size=0)
    with pytest.raises(ValueError, match="num_layers 6 is larger"):
        prune_structured(m, 0.0, x, num_layers=6)
    with pytest.raises(ValueError, match="calibration is required"):
        prune_structured(m, 0.0, None, num_layers=2)
    assert m.config.num_hidden_layers == 4 and len(m.model.layers) == 4  # nothing changed


@pytest.mark.parametrize("calib,err,match", [
    (lambda g: torch.randn(2, 8, generator=g), ValueError, "calibration must hold integer token ids"),
    (lambda g: torch.randint(0, VOCAB, (8,), generator=g), ValueError, "calibration must be 2-D"),
    (lambda g: torch.randint(0, VOCAB, (3, 1), generator=g), ValueError, "smaller than one block"),
    (lambda g: torch.zeros(0, 8, dtype=torch.long), ValueError, "smaller than one block"),
    (lambda g: torch.full((2, 8), VOCAB), ValueError, "outside the model's vocabulary"),
    (lambda g: torch.randint(0, VOCAB, (1, 40), generator=g), ValueError, "exceed the model's 32 positions"),
    (lambda g: [[1, 2, 3]], TypeError, "calibration must be a torch.Tensor"),
])
def test_bad_calibration(seeded, calib, err, match):
    m = _model("llama", seeded, layers=3)
    with pytest.raises(err, match=match):
        prune_to_shape(m, {"num_hidden_layers": 2}, calib(seeded))


def test_models_that_cannot_be_depth_pruned(seeded):
    x = torch.randint(0, VOCAB, (2, 8), generator=seeded)
    with pytest.raises(ValueError, match="needs a transformers decoder-only causal LM"):
        prune_to_shape(torch.nn.Linear(4, 4), {"num_hidden_layers": 1}, x)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=16,
                                                                      num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match="decoder-only causal LM"):
        prune_to_shape(t5, {"num_hidden_layers": 1}, x)
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                                             ffn_dim=16, num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="model_type 'opt', whose layer layout is not known"):
        prune_to_shape(opt, {"num_hidden_layers": 1}, x)
    g = tiny_lm("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        prune_to_shape(g, {"num_hidden_layers": 2}, x)


def test_calibration_sample(seeded):
    from raydistill.compress.structured_lm import calibration_sample

    blocks = torch.randint(0, VOCAB, (20, 6), generator=seeded, dtype=torch.int32)
    a, b = calibration_sample(blocks, 5, seed=1), calibration_sample(blocks.numpy(), 5, seed=1)
    assert a.dtype == torch.int64 and a.shape == (5, 6) and torch.equal(a, b)
    rows = {tuple(r) for r in blocks.tolist()}
    assert all(tuple(r) in rows for r in a.tolist()) and len({tuple(r) for r in a.tolist()}) == 5  # distinct blocks
    assert not torch.equal(calibration_sample(blocks, 20, seed=1), calibration_sample(blocks, 20, seed=2))
    with pytest.raises(ValueError, match=r"student.init.calibration_blocks must be at least one block"):
        calibration_sample(blocks, 0, key="student.init.calibration_blocks")
    with pytest.raises(ValueError, match=r"calibration_blocks 21 exceeds the 20 blocks available"):
        calibration_sample(blocks, 21)
