"""Bootstrap intervals of evaluation metrics (raydistill.tasks.stats) and the per-block items of lm_metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydistill.tasks import stats


def _blocks(rng, m, mu=3.0, sd=0.5, tokens=63):
    tok = np.full(m, float(tokens))
    nll = rng.normal(mu, sd, m) * tok
    return nll, tok


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perplexity_ci_brackets_the_estimate_and_shrinks_with_more_blocks(seed):
    rng = np.random.default_rng(seed)  # fixed draws: a statistical bound must not fail by chance
    nll, tok = _blocks(rng, 400)
    ppl = math.exp(nll.sum() / tok.sum())
    lo, hi = stats.perplexity_ci(nll, tok)
    assert lo < ppl < hi
    lo4, hi4 = stats.perplexity_ci(nll[:25], tok[:25])
    # 16x fewer blocks: about 4x wider, in relative (log) terms (the width of a perplexity interval scales with
    # the perplexity, which differs between the first 25 blocks and all 400). Over seeds 0-299 the ratio was
    # 2.3 at least and 3.85 in the median; an interval that did not shrink gives 1.
    assert math.log(hi4 / lo4) > 2.0 * math.log(hi / lo)


def test_identical_blocks_give_a_zero_width_interval():
    nll, tok = np.full(50, 63 * 2.0), np.full(50, 63.0)
    lo, hi = stats.perplexity_ci(nll, tok)
    assert lo == pytest.approx(math.exp(2.0)) and hi == pytest.approx(math.exp(2.0))


def test_mean_ci_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(200):
        x = (rng.random(300) < 0.8).astype(float)
        lo, hi = stats.mean_ci(x, n_boot=500)
        hits += lo <= 0.8 <= hi
    assert 0.88 <= hits / 200 <= 0.995


def test_paired_change_cancels_block_difficulty():
    """B = A + a constant 0.1 nats per token on every block: the paired change is exp(-0.1) - 1 exactly, with
    an interval of zero width, although the blocks' own perplexities vary a lot."""
    rng = np.random.default_rng(3)
    nll_b, tok = _blocks(rng, 200, sd=1.0)
    nll_a = nll_b - 0.1 * tok
    d = stats.paired_perplexity_change(nll_a, nll_b, tok)
    assert d["change"] == pytest.approx(math.exp(-0.1) - 1)
    assert d["ci95"][0] == pytest.approx(d["change"]) and d["ci95"][1] == pytest.approx(d["change"])
    sep_a, sep_b = stats.perplexity_ci(nll_a, tok), stats.perplexity_ci(nll_b, tok)
    assert sep_a[1] > sep_b[0]  # the separate intervals overlap: they could not tell A from B


def test_paired_mean_difference_sign_and_interval():
    rng = np.random.default_rng(11)
    b = (rng.random(1000) < 0.6).astype(float)
    a = b.copy()
    flip = rng.choice(np.flatnonzero(b == 0), 100, replace=False)
    a[flip] = 1.0  # A right on 100 more examples
    d = stats.paired_mean_difference(a, b)
    assert d["change"] == pytest.approx(0.1)
    assert 0.07 < d["ci95"][0] < 0.1 < d["ci95"][1] < 0.13


def test_many_blocks_are_grouped_and_give_the_same_interval():
    rng = np.random.default_rng(5)
    nll, tok = _blocks(rng, 20 * stats.MAX_GROUPS)
    lo, hi = stats.perplexity_ci(nll, tok)
    ppl = math.exp(nll.sum() / tok.sum())
    # the analytic standard error of the mean NLL per token: sd / sqrt(m) -> ppl * (1 +- 1.96 se)
    se = 0.5 / math.sqrt(len(nll))
    assert lo == pytest.approx(ppl * math.exp(-1.96 * se), rel=3e-3)
    assert hi == pytest.approx(ppl * math.exp(1.96 * se), rel=3e-3)


def test_lm_metrics_items_are_each_blocks_summed_nll():
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydistill.tasks.causal_lm import lm_metrics, next_token_labels

    torch.manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    student, teacher = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 40, (7, 12))
    ids[3, 8:] = 0  # padding: its targets are not scored
    m = lm_metrics(student, ids, 0, 40, teacher=teacher, batch_size=3, items=True)
    lab = next_token_labels(ids, 0)
    with torch.no_grad():
        for key, net in (("nll", student), ("teacher_nll", teacher)):
            per_tok = torch.nn.functional.cross_entropy(net(input_ids=ids).logits.double().transpose(1, 2), lab,
                                                        ignore_index=-100, reduction="none")
            np.testing.assert_allclose(m["_items"][key], per_tok.sum(1).numpy(), rtol=1e-5)
    assert m["_items"]["tokens"] == (lab != -100).sum(1).double().tolist()
    assert m["eval_tokens"] == int((lab != -100).sum()) and m["eval_blocks"] == 7
    lo, hi = m["perplexity_ci95"]
    assert lo <= m["perplexity"] <= hi
    assert "_items" not in lm_metrics(student, ids, 0, 40)
