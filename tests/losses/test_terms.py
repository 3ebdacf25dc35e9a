"""Every loss term and the Criterion against float64 references written here from the definitions, values
and gradients (students' logits / hidden states / output layer and the hidden terms' projections), on
fresh random inputs; the fused kd_logits + ce call against the sum of the two terms; term and layer-map
errors naming the key."""

from __future__ import annotations

import math

import pytest
import torch

from raydistill.losses import Criterion, Layout, Needs, Outputs, StepOutputs, TERMS
from raydistill.losses.terms import resolve_layers

IGN = -100
T = 2.0


def kd_spec(weight=1.0, teachers=None, combine="sum", divergence="forward_kl", temperature=T, key="distill.terms.0"):
    return {"type": "kd_logits", "weight": weight, "teachers": teachers or {"main": 1.0}, "combine": combine,
            "temperature": temperature, "divergence": divergence, "beta": 0.5, "key": key}


def ce_spec(weight=1.0):
    return {"type": "ce", "weight": weight, "key": "distill.terms.1"}


def layer_spec(kind="hidden", weight=1.0, layers="uniform", metric="mse", projection=True, teacher="main"):
    return {"type": kind, "weight": weight, "teacher": teacher, "layers": layers, "metric": metric,
            "projection": projection, "key": "distill.terms.2"}


# ---------------------------------------------------------------------------------------------------------
# float64 references, from the definitions


def ref_kd(s, t, rows, temperature=T, divergence="forward_kl", beta=0.5):
    """T^2 * D(softmax(t/T), softmax(s/T)) averaged over ``rows``."""
    lpt, lps = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    pt, ps = lpt.exp(), lps.exp()
    if divergence == "forward_kl":
        d = (pt * (lpt - lps)).sum(-1)
    elif divergence == "reverse_kl":
        d = (ps * (lps - lpt)).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        lm = m.log()
        d = beta * (pt * (lpt - lm)).sum(-1) + (1 - beta) * (ps * (lps - lm)).sum(-1)
    return temperature ** 2 * d[rows].mean()


def ref_ce(s, labels):
    keep = labels != IGN
    return -(torch.log_softmax(s, -1)[keep].gather(-1, labels[keep].unsqueeze(-1))).mean()


def ref_mixture_kd(s, ts, ws, rows, temperature=T):
    """Forward KL of the weighted mean of the teachers' distributions against the student's, times T^2."""
    w = torch.tensor(ws, dtype=torch.float64) / sum(ws)
    mix = sum(wi * torch.softmax(t / temperature, -1) for wi, t in zip(w, ts))
    lps = torch.log_softmax(s / temperature, -1)
    return temperature ** 2 * (mix * (mix.log() - lps)).sum(-1)[rows].mean()


def ref_hidden(hs, ht, proj_w, mask, metric):
    a = hs[mask] @ proj_w.T if proj_w is not None else hs[mask]
    b = ht[mask]
    if metric == "mse":
        return ((a - b) ** 2).mean()
    return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()


def ref_relation(hs, ht, mask):
    def pool(h):
        m = mask.double().unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1)

    def gram(x):
        g = x @ x.T
        return g / g.norm(dim=1, keepdim=True)

    gs, gt = gram(pool(hs)), gram(pool(ht))
    return ((gs - gt) ** 2).sum() / gs.shape[0] ** 2


# ---------------------------------------------------------------------------------------------------------
# helpers


def rand(*shape, grad=False):
    x = torch.randn(*shape, dtype=torch.float64) * 1.5
    return x.requires_grad_(grad)


def lm_batch(B=3, S=7, V=11, pad_from=5):
    """Labels with ignored positions (the last one, padding) and a hidden-state mask without padding."""
    labels = torch.randint(0, V, (B, S))
    labels[:, -1] = IGN
    labels[0, pad_from - 1:] = IGN
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, pad_from:] = False
    return labels, mask


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------


def test_registry_holds_every_config_term_type():
    from raydistill.config import TERM_MODELS

    assert set(TERMS) == set(TERM_MODELS) == {"kd_logits", "ce", "hidden", "relation"}


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_logits_and_ce_terms_match_the_reference(divergence):
    torch.manual_seed(0)
    V = 11
    labels, mask = lm_batch(V=V)
    s, t = rand(3, 7, V, grad=True), rand(3, 7, V + 3)  # a padded teacher vocabulary is sliced to V
    out = StepOutputs(student=Outputs(logits=s), teachers={"main": Outputs(logits=t[..., :V])}, labels=labels,
                      mask=mask, vocab=V)
    rows = labels != IGN
    for spec, ref in ((kd_spec(divergence=divergence), ref_kd(s, t[..., :V], rows, divergence=divergence)),
                      (ce_spec(), ref_ce(s, labels))):
        crit = Criterion([spec])
        got = crit(out)
        close(got, ref)
        close(grads(got, s)[0], grads(ref, s)[0])
        assert crit.values(out) == {crit.labels[0]: pytest.approx(float(ref.detach()), rel=1e-12)}


def test_fused_pair_is_the_weighted_sum_of_the_two_terms_in_one_call(monkeypatch):
    """kd_logits + ce of one teacher: ONE kd_loss call with alpha = w_kd / (w_kd + w_ce), scaled, equal to
    w_kd * kd + w_ce * ce (values and gradients), for weights summing to 1 and not."""
    import raydistill.ops._kd_loss as K

    torch.manual_seed(1)
    V = 9
    labels, mask = lm_batch(V=V)
    s, t = rand(3, 7, V, grad=True), rand(3, 7, V)
    out = StepOutputs(student=Outputs(logits=s), teachers={"main": Outputs(logits=t)}, labels=labels, mask=mask,
                      vocab=V)
    calls = []
    real = K._run
    monkeypatch.setattr(K, "_run", lambda *a, **k: calls.append(a[5]) or real(*a, **k))  # a[5]: alpha
    for w_kd, w_ce in ((0.7, 0.3), (2.0, 0.5)):
        calls.clear()
        crit = Criterion([kd_spec(weight=w_kd), ce_spec(weight=w_ce)])
        assert crit.pair == (0, 1)
        got = crit(out)
        assert calls == [pytest.approx(w_kd / (w_kd + w_ce))]
        ref = w_kd * ref_kd(s, t, labels != IGN) + w_ce * ref_ce(s, labels)
        close(got, ref)
        close(grads(got, s)[0], grads(ref, s)[0])
    unfused = Criterion([kd_spec(weight=2.0), ce_spec(weight=0.5)], fuse=False)
    close(unfused(out), 2.0 * ref_kd(s, t, labels != IGN) + 0.5 * ref_ce(s, labels))


def test_fused_pair_on_the_output_layer_never_builds_logits():
    """The student's last hidden states + lm_head (and the teacher's) through kd_loss_linear: the same loss
    and gradients (hidden states, head weight and bias) as the reference on materialised logits."""
    torch.manual_seed(2)
    V, H, Ht = 13, 6, 8
    labels, mask = lm_batch(V=V)
    h, w, b = rand(3, 7, H, grad=True), rand(V + 2, H, grad=True), rand(V + 2, grad=True)
    ht, wt = rand(3, 7, Ht), rand(V + 4, Ht)
    out = StepOutputs(student=Outputs(head=(h, w, b)), teachers={"main": Outputs(head=(ht, wt, None))},
                      labels=labels, mask=mask, vocab=V)
    crit = Criterion([kd_spec(weight=0.6), ce_spec(weight=0.4)])
    assert crit.needs()[None] == Needs(logits=True, head=True) and crit.needs()["main"].head
    got = crit(out)
    s = h @ w[:V].T + b[:V]
    ref = 0.6 * ref_kd(s, (ht @ wt.T)[..., :V], labels != IGN) + 0.4 * ref_ce(s, labels)
    close(got, ref)
    for a, r in zip(grads(got, h, w, b), grads(ref, h, w, b)):
        close(a, r)


def test_ce_value_on_the_output_layer_is_computed_in_chunks_without_materialising_the_logits(monkeypatch):
    """The ce term's value without gradient (the logs' term values, on the output layer) is the reference
    cross-entropy, computed over chunks of rows (so a batch's (tokens, vocab) logits never exist at once),
    over the first ``vocab`` ids of a padded head; no labelled row gives nan like F.cross_entropy."""
    from raydistill.losses import terms

    torch.manual_seed(5)
    V, H = 13, 6
    labels, mask = lm_batch(V=V)
    h, w, b = rand(3, 7, H), rand(V + 3, H), rand(V + 3)
    out = StepOutputs(student=Outputs(head=(h, w, b)), teachers={}, labels=labels, mask=mask, vocab=V)
    monkeypatch.setattr(terms, "CE_CHUNK_BYTES", 4 * V * 4)  # 4 rows a chunk: 6 chunks over 21 rows
    shapes = []
    real_linear = terms.F.linear
    monkeypatch.setattr(terms.F, "linear", lambda *a: shapes.append(a[0].shape[0]) or real_linear(*a))
    crit = Criterion([ce_spec()])
    got = crit.values(out)["ce"]
    assert shapes == [4, 4, 4, 4, 4, 1]
    assert got == pytest.approx(float(ref_ce(h @ w[:V].T + b[:V], labels)), rel=1e-12)
    with torch.no_grad():
        none = terms.chunked_cross_entropy((h, w, b), torch.full_like(labels, IGN), V, IGN)
    assert math.isnan(float(none))
    # with gradient: the plain path (its logits are needed for the backward anyway)
    hg = h.clone().requires_grad_(True)
    shapes.clear()
    loss = crit(StepOutputs(student=Outputs(head=(hg, w, b)), teachers={}, labels=labels, mask=mask, vocab=V))
    assert shapes == [3]  # one F.linear over the whole (3, 7, H) batch
    close(loss, ref_ce(hg @ w[:V].T + b[:V], labels))


def test_topk_teacher_and_unlabelled_rows():
    """An offline top-k teacher (forward KL over its k entries); classification rows without a hard label
    get the soft term only (kd_mask), the hard term skips them, and the pair is then not fused."""
    torch.manual_seed(3)
    V, k = 10, 4
    s = rand(8, V, grad=True)
    t = rand(8, V)
    vals, idx = t.topk(k, dim=-1)
    labels = torch.randint(0, V, (8,))
    labels[[1, 5]] = IGN
    out = StepOutputs(student=Outputs(logits=s), teachers={"main": Outputs(topk=(vals, idx))}, labels=labels,
                      mask=torch.ones(8, dtype=torch.bool), vocab=V, kd_mask=torch.ones(8, dtype=torch.bool))
    crit = Criterion([kd_spec(weight=0.8), ce_spec(weight=0.2)])
    got = crit(out)
    t_k = torch.full_like(t, -math.inf).scatter(-1, idx, vals)  # the teacher's top-k, nothing elsewhere
    lpt = torch.log_softmax(t_k / T, -1)
    pt = lpt.exp()
    kd = T ** 2 * torch.where(pt > 0, pt * (lpt - torch.log_softmax(s / T, -1)), 0.0).sum(-1).mean()
    ref = 0.8 * kd + 0.2 * ref_ce(s, labels)
    close(got, ref)
    close(grads(got, s)[0], grads(ref, s)[0])


def ref_kd_topk_tail(s, vals, idx, tail, rows, temperature=T):
    """Forward KL with the rest bucket, from the definition: the teacher is (1 - R) softmax(vals / T) on its k
    ids plus R = exp(tail) on the rest; the student's rest is its softmax mass outside those ids. Times T^2,
    averaged over ``rows``."""
    lps = torch.log_softmax(s / temperature, -1)
    r = tail.exp()
    q = (1 - r).unsqueeze(-1) * torch.softmax(vals / temperature, -1)
    p_k = lps.gather(-1, idx)
    p_rest = torch.log1p(-p_k.exp().sum(-1))
    d = (q * (q.log() - p_k)).sum(-1) + r * (tail - p_rest)
    return temperature ** 2 * d[rows].mean()


@pytest.mark.parametrize("head", [False, True])
def test_topk_teacher_tail_reaches_the_fused_pair(head):
    """An offline top-k teacher with its tail (``Outputs.topk_tail``, what a cache's ``topk_tail`` column
    becomes): the fused kd_logits + ce call (``kd_loss_topk``, or ``kd_loss_linear_topk`` on the output
    layer) equals w_kd * (forward KL with the rest bucket) + w_ce * CE, values and gradients; without the
    tail the loss differs (the tail is not dropped on the way)."""
    torch.manual_seed(4)
    V, k, H = 12, 4, 5
    labels, mask = lm_batch(V=V)
    full = rand(3, 7, V)
    vals, idx = full.topk(k, dim=-1)
    perm = torch.randperm(k)
    vals, idx = vals[..., perm], idx[..., perm]  # the cache keeps ids ascending, not by value
    tail = torch.log(torch.rand(3, 7, dtype=torch.float64) * 0.5 + 0.05)
    if head:
        h, w, b = rand(3, 7, H, grad=True), rand(V + 3, H, grad=True), rand(V + 3, grad=True)
        student, params = Outputs(head=(h, w, b)), (h, w, b)
        s = h @ w[:V].T + b[:V]
    else:
        s = rand(3, 7, V, grad=True)
        student, params = Outputs(logits=s), (s,)

    def step(t):
        return StepOutputs(student=student, teachers={"main": Outputs(topk=(vals, idx), topk_tail=t)},
                           labels=labels, mask=mask, vocab=V)

    crit = Criterion([kd_spec(weight=0.7), ce_spec(weight=0.3)])
    assert crit.pair == (0, 1)
    got = crit(step(tail))
    ref = 0.7 * ref_kd_topk_tail(s, vals, idx, tail, labels != IGN) + 0.3 * ref_ce(s, labels)
    close(got, ref)
    for a, r in zip(grads(got, *params), grads(ref, *params)):
        close(a, r)
    without = crit(step(None))
    assert abs(float(without.detach()) - float(got.detach())) > 1e-3


def test_several_teachers_weighted_sum_and_mean_of_distributions():
    torch.manual_seed(4)
    V = 12
    labels, mask = lm_batch(V=V)
    rows = labels != IGN
    s, ta, tb = rand(3, 7, V, grad=True), rand(3, 7, V), rand(3, 7, V + 2)
    out = StepOutputs(student=Outputs(logits=s), teachers={"a": Outputs(logits=ta), "b": Outputs(logits=tb[..., :V])},
                      labels=labels, mask=mask, vocab=V)
    summed = Criterion([kd_spec(teachers={"a": 0.25, "b": 1.5})])
    ref = 0.25 * ref_kd(s, ta, rows) + 1.5 * ref_kd(s, tb[..., :V], rows)
    close(summed(out), ref)
    close(grads(summed(out), s)[0], grads(ref, s)[0])
    mean = Criterion([kd_spec(teachers={"a": 0.25, "b": 1.5}, combine="mean")])
    assert not mean.needs()["a"].head  # the mixture needs the teachers' logits
    ref = ref_mixture_kd(s, [ta, tb[..., :V]], [0.25, 1.5], rows)
    close(mean(out), ref)
    close(grads(mean(out), s)[0], grads(ref, s)[0])
    # one kd term per teacher + ce: the first teacher's term is fused with ce, the second runs on its own
    two = Criterion([kd_spec(teachers={"a": 1.0}), kd_spec(teachers={"b": 1.0}, key="distill.terms.2"),
                     ce_spec(0.5)])
    assert two.pair == (0, 2) and two.labels == ["kd_logits:a", "kd_logits:b", "ce"]
    close(two(out), ref_kd(s, ta, rows) + ref_kd(s, tb[..., :V], rows) + 0.5 * ref_ce(s, labels))


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_term_with_projection_matches_the_reference(metric):
    """Layer pairs of a uniform map; the student's states go through a learned projection where the widths
    differ (gradient to it too), padded positions count for nothing."""
    torch.manual_seed(5)
    labels, mask = lm_batch()
    student, teacher = Layout((6, 6)), Layout((5, 5, 5, 5))
    crit = Criterion([layer_spec(metric=metric)], student=student, teachers={"main": teacher}).double()
    term = crit.terms[0]
    assert term.pairs == [(1, 2), (2, 4)] and len(list(crit.parameters())) == 2
    assert crit.needs() == {None: Needs(hidden=frozenset({1, 2})), "main": Needs(hidden=frozenset({2, 4}))}
    hs = {i: rand(3, 7, 6, grad=True) for i in (1, 2)}
    ht = {i: rand(3, 7, 5) for i in (2, 4)}
    out = StepOutputs(student=Outputs(hidden=hs), teachers={"main": Outputs(hidden=ht)}, labels=labels, mask=mask,
                      vocab=11)
    got = crit(out)
    ws = [p.weight for p in term.projections]
    ref = (ref_hidden(hs[1], ht[2], ws[0], mask, metric) + ref_hidden(hs[2], ht[4], ws[1], mask, metric)) / 2
    close(got, ref)
    for a, r in zip(grads(got, hs[1], hs[2], *ws), grads(ref, hs[1], hs[2], *ws)):
        close(a, r)
    g_pad = grads(crit(out), hs[1])[0][~mask]
    assert torch.count_nonzero(g_pad) == 0  # padding: no gradient at all
    # equal widths: no projection, no parameters
    same = Criterion([layer_spec(metric=metric, layers=[[2, 1]])], student=student, teachers={"main": Layout((6,))})
    assert not list(same.parameters())
    h, t6 = rand(3, 7, 6, grad=True), rand(3, 7, 6)
    o = StepOutputs(student=Outputs(hidden={2: h}), teachers={"main": Outputs(hidden={1: t6})}, labels=labels,
                    mask=mask, vocab=11)
    close(same(o), ref_hidden(h, t6, None, mask, metric))


def test_relation_term_matches_the_reference():
    torch.manual_seed(6)
    labels, mask = lm_batch()
    crit = Criterion([layer_spec("relation", layers="last")], student=Layout((6, 6)),
                     teachers={"main": Layout((9, 9, 9))})
    assert crit.terms[0].pairs == [(2, 3)] and not list(crit.parameters())
    hs, ht = rand(3, 7, 6, grad=True), rand(3, 7, 9)
    out = StepOutputs(student=Outputs(hidden={2: hs}), teachers={"main": Outputs(hidden={3: ht})}, labels=labels,
                      mask=mask, vocab=11)
    got = crit(out)
    ref = ref_relation(hs, ht, mask)
    close(got, ref)
    close(grads(got, hs)[0], grads(ref, hs)[0])
    # rows (classification): no pooling
    x, y = rand(5, 6, grad=True), rand(5, 4)
    out = StepOutputs(student=Outputs(hidden={2: x}), teachers={"main": Outputs(hidden={3: y})},
                      labels=torch.zeros(5, dtype=torch.long), mask=torch.ones(5, dtype=torch.bool), vocab=3)

    def gram(z):
        g = z @ z.T
        return g / g.norm(dim=1, keepdim=True)

    close(crit(out), ((gram(x) - gram(y)) ** 2).sum() / 25)


def _every_term(seed: int, V: int, specs: list):
    """A criterion of ``specs`` (kd_logits, ce, hidden and relation on layer 1 of a 4-wide student and a 3-wide
    teacher) over fresh float64 outputs: (criterion, outputs, s, t, hs, ht, labels, mask, projection)."""
    torch.manual_seed(seed)
    labels, mask = lm_batch(V=V)
    s, t = rand(3, 7, V, grad=True), rand(3, 7, V)
    hs, ht = rand(3, 7, 4, grad=True), rand(3, 7, 3)
    crit = Criterion(specs, student=Layout((4,)), teachers={"main": Layout((3,))}).double()
    out = StepOutputs(student=Outputs(logits=s, hidden={1: hs}), teachers={"main": Outputs(logits=t, hidden={1: ht})},
                      labels=labels, mask=mask, vocab=V)
    return crit, out, s, t, hs, ht, labels, mask, crit.terms[2].projections[0].weight


def test_every_term_together_is_the_weighted_sum():
    specs = [kd_spec(weight=0.5), ce_spec(0.5), layer_spec(weight=0.1, layers=[[1, 1]]),
             layer_spec("relation", weight=0.2, layers=[[1, 1]]), {**ce_spec(0.0), "key": "distill.terms.4"}]
    crit, out, s, t, hs, ht, labels, mask, w = _every_term(7, 8, specs)
    assert crit.labels == ["kd_logits:main", "ce", "hidden:main", "relation:main"]  # weight 0: not computed
    ref = 0.5 * ref_kd(s, t, labels != IGN) + 0.5 * ref_ce(s, labels) + 0.1 * ref_hidden(hs, ht, w, mask, "mse") \
        + 0.2 * ref_relation(hs, ht, mask)
    got = crit(out)
    close(got, ref)
    for a, r in zip(grads(got, s, hs, w), grads(ref, s, hs, w)):
        close(a, r)
    vals = crit.values(out)
    assert vals["hidden:main"] == pytest.approx(float(ref_hidden(hs, ht, w, mask, "mse").detach()), rel=1e-12)


def test_the_steps_forward_records_each_terms_value_without_changing_the_loss_or_its_gradients():
    """``criterion(out, values=d)`` (the epoch's last step: the logs' term values) gives the same total and
    gradients bit for bit, and fills ``d`` with each term's unweighted value, the fused kd_logits + ce pair
    split into its two terms: equal to ``values()`` and to the float64 references."""
    specs = [kd_spec(weight=0.7), ce_spec(0.3), layer_spec(weight=0.25, layers=[[1, 1]]),
             layer_spec("relation", weight=1.0, layers=[[1, 1]])]
    crit, out, s, t, hs, ht, labels, mask, w = _every_term(11, 9, specs)
    assert crit.pair == (0, 1)
    plain = crit(out)
    rec: dict = {}
    recorded = crit(out, values=rec)
    assert torch.equal(recorded, plain)
    for a, b in zip(grads(recorded, s, hs, w), grads(plain, s, hs, w)):
        assert torch.equal(a, b)
    assert set(rec) == set(crit.labels) and all(not v.requires_grad for v in rec.values())
    assert {k: float(v) for k, v in rec.items()} == pytest.approx(crit.values(out), rel=1e-12)
    refs = {"kd_logits:main": ref_kd(s, t, labels != IGN), "ce": ref_ce(s, labels),
            "hidden:main": ref_hidden(hs, ht, w, mask, "mse"), "relation:main": ref_relation(hs, ht, mask)}
    for k, r in refs.items():
        assert float(rec[k]) == pytest.approx(float(r.detach()), rel=1e-9), k


def test_layer_maps_and_their_errors_name_the_key():
    s4, t2, t6 = Layout((8,) * 4), Layout((8,) * 2), Layout((8,) * 6)
    assert resolve_layers("uniform", s4, t6, "k", "main") == [(1, 2), (2, 3), (3, 5), (4, 6)]
    assert resolve_layers("uniform", s4, t2, "k", "main") == [(2, 1), (4, 2)]
    assert resolve_layers("last", s4, t6, "k", "main") == [(4, 6)]
    with pytest.raises(ValueError, match=r"distill.terms.2.layers: 3 layer pairs, more than the depth of the "
                                         r"student \(4\) or of teacher 'main' \(2\)"):
        Criterion([layer_spec(layers=[[1, 1], [2, 2], [3, 2]])], student=s4, teachers={"main": t2})
    with pytest.raises(ValueError, match=r"distill.terms.2.layers: layer 5 of the student does not exist"):
        Criterion([layer_spec(layers=[[5, 1]])], student=s4, teachers={"main": t2})
    with pytest.raises(ValueError, match=r"layer 3 of the teacher 'main' does not exist \(layers 1..2\)"):
        Criterion([layer_spec(layers=[[1, 3]])], student=s4, teachers={"main": t2})
    with pytest.raises(ValueError, match=r"distill.terms.2.projection: student layer 1 is 8 wide, layer 1 of "
                                         r"teacher 'main' 5"):
        Criterion([layer_spec(layers=[[1, 1]], projection=False)], student=s4, teachers={"main": Layout((5,))})
    with pytest.raises(ValueError, match=r"distill.terms.2.layers: teacher 'main' has no hidden layers"):
        Criterion([layer_spec()], student=s4, teachers={"main": Layout(())})
    with pytest.raises(ValueError, match=r"distill.terms.2.teacher: the hidden layers of teacher 'main' are "
                                         r"unknown"):
        Criterion([layer_spec()], student=s4, teachers={})
    with pytest.raises(ValueError, match=r"every term's weight is 0"):
        Criterion([kd_spec(weight=0.0), ce_spec(0.0)])
    with pytest.raises(ValueError, match=r"distill.terms.0.type: unknown loss term 'attention'"):
        Criterion([{"type": "attention", "weight": 1.0, "key": "distill.terms.0"}])


def test_mixture_logits_are_the_log_of_the_mean_distribution():
    from raydistill.losses.terms import mixture_logits

    torch.manual_seed(8)
    a, b = rand(4, 7), rand(4, 9)
    mix = mixture_logits([Outputs(logits=a), Outputs(logits=b[:, :7])], [1.0, 3.0], 7, T)
    want = 0.25 * torch.softmax(a / T, -1) + 0.75 * torch.softmax(b[:, :7] / T, -1)
    torch.testing.assert_close(torch.softmax(mix.double() / T, -1), want, rtol=1e-5, atol=1e-7)
