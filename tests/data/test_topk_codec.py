"""The top-k codecs (raydistill.data.topk_codec): round trips on random rows (hypothesis), the quantisation
bounds, the KL the q8 codec is designed for, damaged payloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raydistill.data import topk_codec as C


def _rows(rng, n, V, k, scale=3.0):
    """Top-k log-probabilities (T = 1), ids and tails of random teacher logits."""
    logits = torch.from_numpy(rng.standard_normal((n, V)) * scale)
    v, i, t = C.topk_from_logits(logits, k, 1.0)
    return v.numpy(), i.numpy(), t.numpy()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), V=st.integers(1, 700), kfrac=st.floats(0.0, 1.0), coding=st.sampled_from(C.INDEX_CODINGS),
       levels=st.one_of(st.none(), st.integers(2, 256)), gamma=st.floats(0.1, 1.0), scale=st.floats(0.1, 8.0),
       seed=st.integers(0, 2**32 - 1))
def test_q8_round_trip(n, V, kfrac, coding, levels, gamma, scale, seed):
    rng = np.random.default_rng(seed)
    k = max(1, min(V, int(round(kfrac * V))))
    v, i, t = _rows(rng, n, V, k, scale)
    spec = C.CodecSpec(value_levels=levels, gamma=gamma, index_coding=coding).resolved(k, V)
    assert spec.index_coding in ("bitmap", "gaps") and 2 <= spec.value_levels <= 256
    enc = C.encode(v, i, t, V, spec)
    assert set(enc) == {"indices", "values", "tail"}
    for b, per_token in enc.values():
        assert b.dtype == np.uint8 and per_token.shape == (n,) and per_token.sum() == len(b)
    dv, di, dt = C.decode({f: b for f, (b, _) in enc.items()}, n, k, V, spec)
    assert di.dtype == np.int64 and dv.dtype == np.float32 and dv.shape == di.shape == (n, k)
    # ids: exactly the same set, ascending
    np.testing.assert_array_equal(di, np.sort(i, 1))
    if n and k > 1:
        assert (np.diff(di, axis=1) > 0).all()
    # values (matched by id): within half a step of u = p ** gamma (code 0: in its bin)
    want = np.take_along_axis(v, np.argsort(i, 1), 1).astype(np.float64)
    step = 1.0 / (spec.value_levels - 1)
    u, ud = np.exp(gamma * want), np.exp(gamma * dv.astype(np.float64))
    zero = u < step / 2
    assert (np.abs(u - ud)[~zero] <= step / 2 + 1e-5).all()
    assert np.allclose(ud[zero], step / 4, rtol=1e-4)
    # tail: within half a step of sqrt(R)
    r, rd = np.exp(t.astype(np.float64)), np.exp(dt.astype(np.float64))
    big = np.sqrt(r) >= 0.5 / 255
    assert (np.abs(np.sqrt(r) - np.sqrt(rd))[big] <= 0.5 / 255 + 1e-6).all()
    assert (rd[~big] < 2e-6).all() and np.isfinite(dt).all()


@settings(max_examples=40, deadline=None)
@given(x=st.lists(st.integers(0, 2**40), max_size=50))
def test_varint_round_trip(x):
    arr = np.array(x, np.int64)
    b, nb = C._varint_encode(arr)
    assert nb.sum() == len(b) and all(int(n) == max(1, math.ceil(int(v).bit_length() / 7)) for v, n in zip(x, nb))
    np.testing.assert_array_equal(C._varint_decode(b, len(x)), arr)


def test_gaps_coding_handles_large_vocabularies():
    rng = np.random.default_rng(1)
    V, k = 200_003, 64
    i = np.stack([rng.choice(V, k, replace=False) for _ in range(5)])
    spec = C.CodecSpec(index_coding="auto").resolved(k, V)
    assert spec.index_coding == "gaps"
    b, _ = C.encode_indices(np.sort(i, 1), V, spec)
    np.testing.assert_array_equal(C.decode_indices(b, 5, k, V, spec), np.sort(i, 1))


@pytest.mark.parametrize("k", [16, 128])
@pytest.mark.parametrize("levels", [64, 170])
def test_q8_kl_matches_its_design_rule(k, levels):
    """KL(exact || decoded) of the q8 values ~ k / (6 (L - 1)^2) whatever the teacher (the rule
    value_levels=None uses), on LM-like rows (a few large probabilities and a long tail)."""
    rng = np.random.default_rng()
    V = 1024
    logits = torch.from_numpy(rng.standard_normal((2000, V)) * 2.5 + rng.gumbel(size=(2000, V)) * 1.5)
    v, i, t = (a.numpy() for a in C.topk_from_logits(logits, k, 1.0))
    spec = C.CodecSpec(value_levels=levels).resolved(k, V)
    dv, di, dt = C.decode({f: b for f, (b, _) in C.encode(v, i, t, V, spec).items()}, len(v), k, V, spec)
    fid = C.fidelity(v, i, t, dv, di, dt)
    rule = k / (6 * (levels - 1) ** 2)
    assert 0.5 * rule < fid["kl_topk"] < 1.5 * rule, (fid, rule)
    assert 0 < fid["kl_with_tail"] < 1.5 * rule


def test_default_codec_fidelity_below_1e3_nats():
    rng = np.random.default_rng()
    V, k = 1024, 128
    logits = torch.from_numpy(rng.standard_normal((1000, V)) * 3.0)
    v, i, t = (a.numpy() for a in C.topk_from_logits(logits, k, 1.0))
    spec = C.CodecSpec().resolved(k, V)
    dv, di, dt = C.decode({f: b for f, (b, _) in C.encode(v, i, t, V, spec).items()}, len(v), k, V, spec)
    fid = C.fidelity(v, i, t, dv, di, dt)
    assert fid["kl_topk"] < 1e-3 and fid["kl_with_tail"] < 1e-3
    # a mismatched id set is an infinite KL, not a small number
    assert C.fidelity(v, i, t, dv, (di + 1) % V, dt)["kl_topk"] == math.inf


def test_topk_from_logits_matches_float64():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g, dtype=torch.float64) * 4
    for T in (0.5, 1.0, 3.0):
        v, i, t = C.topk_from_logits(logits.float(), 7, T)
        lp = torch.log_softmax(logits, -1)
        torch.testing.assert_close(v.double(), lp.gather(-1, i), rtol=1e-6, atol=1e-5)
        mass = torch.softmax(logits / T, -1).gather(-1, i).sum(-1)
        torch.testing.assert_close(t.double(), torch.log1p(-mass), rtol=1e-4, atol=1e-5)
    _, _, t = C.topk_from_logits(logits.float(), 50, 1.0)
    assert torch.isneginf(t).all()
    assert C.topk_from_logits(logits.float(), 3, None)[2] is None


def test_damaged_payloads_raise_codec_error():
    rng = np.random.default_rng(4)
    V, k, n = 300, 20, 6
    v, i, t = _rows(rng, n, V, k)
    for coding in ("bitmap", "gaps"):
        spec = C.CodecSpec(index_coding=coding).resolved(k, V)
        enc = {f: b for f, (b, _) in C.encode(v, i, t, V, spec).items()}
        cases = [({**enc, "indices": enc["indices"][:-3]}, "index"),
                 ({**enc, "values": enc["values"][:-1]}, "values: .* bytes"),
                 ({**enc, "tail": enc["tail"][:2]}, "tail"),
                 ({**enc, "values": np.full_like(enc["values"], 255)}, "outside the codec")]
        if coding == "bitmap":
            flipped = enc["indices"].copy()
            flipped[0] ^= 0x01
            cases.append(({**enc, "indices": flipped}, "ids set, expected k"))
            # one id moved from token 1 to token 0: the total is still n * k
            w = (V + 7) // 8
            moved = enc["indices"].copy().reshape(n, w)
            bits0, bits1 = np.unpackbits(moved[0], count=V), np.unpackbits(moved[1], count=V)
            bits0[np.flatnonzero(bits0 == 0)[0]] = 1
            bits1[np.flatnonzero(bits1)[0]] = 0
            moved[0], moved[1] = np.packbits(bits0), np.packbits(bits1)
            cases.append(({**enc, "indices": moved.reshape(-1)}, "token 0 has 21 ids set"))
        for payload, pat in cases:
            with pytest.raises(C.CodecError, match=pat):
                C.decode(payload, n, k, V, spec)


def test_codec_spec_validation():
    for kw, pat in (({"name": "zip"}, "codec must be one of"), ({"value_levels": 300}, "value_levels"),
                    ({"value_levels": 1}, "value_levels"), ({"gamma": 0}, "gamma"), ({"gamma": 1.5}, "gamma"),
                    ({"index_coding": "rle"}, "index_coding"), ({"target_kl": -1}, "target_kl")):
        with pytest.raises(ValueError, match=pat):
            C.CodecSpec(**kw)
    with pytest.raises(ValueError, match="unknown codec parameters"):
        C.CodecSpec.from_dict({"name": "q8", "bits": 4})
    assert C.CodecSpec().resolved(128, 1024).value_levels == 170  # sqrt(128 / (6 * 7.5e-4)) + 1
    assert C.CodecSpec().resolved(4096, 10**6).value_levels == 256  # capped at one byte


# --------------------------------------------------------------------------------------------------
# cm: q8's codes under a context model, range-coded

def _context_rows(rng, n, V, k, n_inputs=20, noise=0.5):
    """Teacher outputs that depend on the input token (as an LM's do): logits = a row of a table picked by the
    token's input id, plus noise; returns (values, ids, tail, input ids)."""
    n_inputs = min(n_inputs, V)
    table = rng.standard_normal((n_inputs, V)) * 3.0
    x = rng.integers(0, n_inputs, n)
    logits = torch.from_numpy(table[x] + noise * rng.standard_normal((n, V)))
    v, i, t = C.topk_from_logits(logits, k, 1.0)
    return v.numpy(), i.numpy(), t.numpy(), x


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("V,k,n,chunk,tail", [(300, 24, 500, 64, True), (300, 24, 500, 1000, False),
                                              (50, 50, 70, 16, False), (1, 1, 5, 2, False), (700, 3, 0, 8, True),
                                              (1024, 128, 300, 128, True), (40, 7, 1, 3, True), (257, 200, 83, 9, True),
                                              (2, 1, 30, 7, True)])
def test_cm_round_trip_gives_q8s_codes(V, k, n, chunk, tail, version, ext):
    """Exact ids, and values bit-identical to q8's at the same levels, over several chunks (the model adapts
    between them; n not a multiple of the chunk), with and without the tail, in both model versions."""
    rng = np.random.default_rng()
    v, i, t, x = _context_rows(rng, n, V, k)
    t = t if tail and k < V else None
    spec = C.CodecSpec(name="cm", chunk_tokens=chunk, codec_version=version).resolved(k, V)
    q8 = C.CodecSpec(name="q8", value_levels=spec.value_levels, index_coding="bitmap").resolved(k, V)
    stream = C.encode_cm(v, i, t, x, V, spec)
    dv, di, dt = C.decode_cm(stream, n, k, t is not None, x, V, spec)
    qv, qi, qt = C.decode({f: b for f, (b, _) in C.encode(v, i, t, V, q8).items()}, n, k, V, q8)
    np.testing.assert_array_equal(di, qi)
    np.testing.assert_array_equal(di, np.sort(i, 1))
    np.testing.assert_array_equal(dv, qv)
    if t is not None:
        np.testing.assert_array_equal(dt, qt)
    else:
        assert dt is None


@pytest.mark.parametrize("levels", [2, 97, 256])
def test_cm_v2_round_trip_random_codes(levels, ext):
    """Version 2 on codes that no teacher would give (uniform codes and ids, a random context per token, every
    level in use): the same ids, codes and tail bytes back."""
    rng = np.random.default_rng()
    from raydistill.data import topk_cm

    for V, k, n, chunk in ((600, 60, 700, 256), (64, 63, 50, 1), (3000, 5, 40, 13)):
        idx = np.sort(np.argsort(rng.random((n, V)), 1)[:, :k], 1)
        codes = rng.integers(0, levels, (n, k)).astype(np.uint8)
        tail = rng.integers(0, 256, n).astype(np.uint8)
        x = rng.integers(0, V, n)
        s = topk_cm.encode(idx, codes, tail, x, V, levels, chunk, version=2)
        di, dc, dt = topk_cm.decode(s, n, k, True, x, V, levels, chunk, version=2)
        np.testing.assert_array_equal(di, idx)
        np.testing.assert_array_equal(dc, codes)
        np.testing.assert_array_equal(dt, tail)


@pytest.mark.parametrize("V,k", [(1024, 128), (300, 1), (300, 299), (64, 32)])
def test_cm_v2_round_trip_when_the_model_is_wrong(V, k, ext):
    """Membership bits at the ends of the probability grid, both ways: each input id's top-k set is the same
    for several chunks (the model learns P(v | x) near 1 for those ids and near 0 for the rest), then moves to
    the ids the model gave the least probability (members at P ~ 2^-16, non-members at P ~ 1), mixed with
    tokens of a fresh random set; ids, codes and tail bytes come back exactly."""
    from raydistill.data import topk_cm

    rng = np.random.default_rng()
    n, chunk, levels, n_in = 600, 40, 170, 3
    x = rng.integers(0, n_in, n)
    first = [np.sort(rng.choice(V, k, replace=False)) for _ in range(n_in)]
    later = [np.setdiff1d(np.arange(V), f)[-k:] if V - k >= k else np.sort(rng.choice(V, k, replace=False))
             for f in first]
    idx = np.stack([first[xi] if t < n // 2 else later[xi] for t, xi in enumerate(x)])
    fresh = rng.random(n) < 0.1
    idx[fresh] = np.sort(np.argsort(rng.random((int(fresh.sum()), V)), 1)[:, :k], 1)
    codes = rng.integers(0, levels, (n, k)).astype(np.uint8)
    tail = rng.integers(0, 256, n).astype(np.uint8)
    s = topk_cm.encode(idx, codes, tail, x, V, levels, chunk, version=2)
    di, dc, dt = topk_cm.decode(s, n, k, True, x, V, levels, chunk, version=2)
    np.testing.assert_array_equal(di, idx)
    np.testing.assert_array_equal(dc, codes)
    np.testing.assert_array_equal(dt, tail)


def test_cm_kl_and_its_context_model():
    """KL(exact || decoded) within the q8 rule at the default levels, and the context model pays: when the
    outputs depend on the input token, cm is far smaller than q8's bytes and than the same rows with the
    input ids hidden from it."""
    rng = np.random.default_rng()
    V, k, n = 1024, 128, 3000
    v, i, t, x = _context_rows(rng, n, V, k, n_inputs=8, noise=0.3)
    spec = C.CodecSpec(name="cm").resolved(k, V)
    stream = C.encode_cm(v, i, t, x, V, spec)
    dv, di, dt = C.decode_cm(stream, n, k, True, x, V, spec)
    fid = C.fidelity(v, i, t, dv, di, dt)
    rule = k / (6 * (spec.value_levels - 1) ** 2)
    assert 0.5 * rule < fid["kl_topk"] < 1.5 * rule and fid["kl_topk"] < 1e-3
    q8_bytes = V // 8 + k + 1
    blind = C.encode_cm(v, i, t, np.zeros(n, np.int64), V, spec)
    assert len(stream) / n < 0.5 * q8_bytes, len(stream) / n
    assert len(stream) < 0.8 * len(blind), (len(stream), len(blind))


@pytest.mark.parametrize("version", [1, 2])
def test_cm_damaged_streams_raise_codec_error(version, ext):
    rng = np.random.default_rng(5)
    V, k, n = 300, 20, 200
    v, i, t, x = _context_rows(rng, n, V, k)
    spec = C.CodecSpec(name="cm", chunk_tokens=50, codec_version=version).resolved(k, V)
    s = C.encode_cm(v, i, t, x, V, spec)
    for pos in (1, 5, 10, 12 + 2 * V + 3, len(s) // 2, len(s) - 1):  # the CRC, the header, the coded words
        bad = s.copy()
        bad[pos] ^= 0x10
        with pytest.raises(C.CodecError, match="CRC-32 mismatch"):
            C.decode_cm(bad, n, k, True, x, V, spec)
    with pytest.raises(C.CodecError, match="CRC-32 mismatch"):
        C.decode_cm(s[:-4], n, k, True, x, V, spec)
    with pytest.raises(C.CodecError, match="truncated" if version == 1 else "CRC-32 mismatch"):
        C.decode_cm(s[:-3], n, k, True, x, V, spec)
    with pytest.raises(C.CodecError, match="header"):
        C.decode_cm(s[:100], n, k, True, x, V, spec)
    with pytest.raises(C.CodecError, match="input ids"):
        C.decode_cm(s, n, k, True, x[:-1], V, spec)
    with pytest.raises(C.CodecError, match="holds 200 tokens, 400 expected"):
        C.decode_cm(s, 2 * n, k, True, np.r_[x, x], V, spec)
    # other input ids than the stream's context would decode to garbage: refused
    with pytest.raises(C.CodecError, match="input ids differ"):
        C.decode_cm(s, n, k, True, (x + 1) % 20, V, spec)


def _recrc(body: np.ndarray) -> np.ndarray:
    """A stream with a valid CRC-32 over ``body`` (the decoder past the CRC check sees the damage)."""
    import zlib

    return np.concatenate([np.array([zlib.crc32(body)], "<u4").view(np.uint8), body])


def test_cm_v2_damage_behind_a_valid_crc(ext):
    """The compiled decoder on streams whose CRC was recomputed: one cut short or run on, or read with other
    parameters, is a CodecError naming it; a corrupted one never reads outside its buffer and gives either a
    CodecError or well-formed output (ascending ids in the vocabulary, codes below the levels)."""
    rng = np.random.default_rng()
    V, k, n = 300, 20, 200
    v, i, t, x = _context_rows(rng, n, V, k)
    spec = C.CodecSpec(name="cm", chunk_tokens=50, codec_version=2).resolved(k, V)
    s = C.encode_cm(v, i, t, x, V, spec)
    head = 16 + 3 * V
    for cut in (1, 7, (len(s) - head) // 2, len(s) - head):
        with pytest.raises(C.CodecError, match="ends (inside token|early)"):
            C.decode_cm(_recrc(s[4:-cut]), n, k, True, x, V, spec)
    with pytest.raises(C.CodecError, match=f"{n} tokens decoded from {len(s) - head} of the stream's "
                                           f"{len(s) - head + 3} bytes"):
        C.decode_cm(_recrc(np.r_[s[4:], np.uint8(1), np.uint8(2), np.uint8(3)]), n, k, True, x, V, spec)
    with pytest.raises(C.CodecError, match="coded with other parameters"):
        C.decode_cm(s, n, k + 1, True, x, V, spec)
    with pytest.raises(C.CodecError, match="coded with other parameters"):
        C.decode_cm(s, n, k, False, x, V, spec)
    with pytest.raises(C.CodecError, match="coded with other parameters"):
        C.decode_cm(s, n, k, True, x, V, C.CodecSpec(name="cm", chunk_tokens=49, codec_version=2).resolved(k, V))
    bad = s.copy()
    bad[12:16] = 1  # the version field
    with pytest.raises(C.CodecError, match="header: model version 16843009"):
        C.decode_cm(_recrc(bad[4:]), n, k, True, x, V, spec)
    errors = 0
    for _ in range(40):
        bad = s.copy()
        pos = rng.integers(head, len(s), 3)
        bad[pos] ^= rng.integers(1, 256, 3).astype(np.uint8)
        try:
            dv, di, dt = C.decode_cm(_recrc(bad[4:]), n, k, True, x, V, spec)
        except C.CodecError as exc:
            assert "coded with other parameters" in str(exc)
            errors += 1
            continue
        assert di.shape == (n, k) and (np.diff(di, axis=1) > 0).all() and di.min() >= 0 and di.max() < V
        assert np.isfinite(dv).all() and dt.shape == (n,)
    assert errors >= 20, errors  # the byte count a stream decodes to catches most damage


def test_cm_v2_encoder_refuses_bad_codes(ext):
    """What the compiled encoder is given is checked there: ids not ascending, codes outside the levels, a
    shard too large for its counters."""
    from raydistill.data import topk_cm

    rng = np.random.default_rng()
    idx = np.sort(np.argsort(rng.random((30, 50)), 1)[:, :6], 1)
    codes = rng.integers(0, 9, (30, 6)).astype(np.uint8)
    x = rng.integers(0, 50, 30)
    bad = idx.copy()
    bad[4, [2, 3]] = bad[4, [3, 2]]
    with pytest.raises(ValueError, match="token 4: ids must be strictly ascending in"):
        topk_cm.encode(bad, codes, None, x, 50, 9, 8, version=2)
    with pytest.raises(ValueError, match="code 9 .*>= levels=9"):
        topk_cm.encode(idx, np.full_like(codes, 9), None, x, 50, 9, 8, version=2)
    with pytest.raises(ValueError, match="model version must be one of"):
        topk_cm.encode(idx, codes, None, x, 50, 9, 8, version=3)


def test_cm_v2_size_close_to_v1(ext):
    """Per-symbol coding of the same model: version 2's stream of outputs that depend on the input token is
    within 2% of version 1's (its own range coder, probabilities on a 2^-16 grid instead of ~130 classes)."""
    rng = np.random.default_rng()
    V, k, n = 1024, 128, 2000
    v, i, t, x = _context_rows(rng, n, V, k, n_inputs=40, noise=0.4)
    s1, s2 = (C.encode_cm(v, i, t, x, V, C.CodecSpec(name="cm", codec_version=ver).resolved(k, V)) for ver in (1, 2))
    assert len(s2) < 1.02 * len(s1), (len(s1), len(s2))


def test_cm_spec_versions_and_vocabulary(ext):
    with pytest.raises(ValueError, match=r"codec 'cm' version 3 is not supported .* reads versions \[1, 2\]"):
        C.CodecSpec(name="cm", codec_version=3)
    with pytest.raises(ValueError, match="codec 'q8' version 2 is not supported"):
        C.CodecSpec(name="q8", codec_version=2)
    with pytest.raises(ValueError, match="chunk_tokens"):
        C.CodecSpec(name="cm", chunk_tokens=0)
    with pytest.raises(ValueError, match="at most 4096"):
        C.CodecSpec(name="cm").resolved(128, 5000)
    assert C.CodecSpec(name="auto").resolved(128, 1024).name == "cm"
    assert C.CodecSpec(name="auto").resolved(128, 32000).name == "q8"
    r = C.CodecSpec(name="cm").resolved(128, 1024)
    assert (r.value_levels, r.index_coding, r.codec_version) == (170, "bitmap", 2)  # new caches: version 2
    assert C.CodecSpec(name="cm", codec_version=1).resolved(128, 1024).codec_version == 1
    assert C.CodecSpec(name="q8").resolved(128, 1024).codec_version == 1
    # a stream read with the other version's metadata is refused, not misread
    rng = np.random.default_rng()
    v, i, t, x = _context_rows(rng, 60, 100, 10)
    s1, s2 = (C.CodecSpec(name="cm", codec_version=ver).resolved(10, 100) for ver in (1, 2))
    with pytest.raises(C.CodecError, match="header: model version"):
        C.decode_cm(C.encode_cm(v, i, t, x, 100, s1), 60, 10, True, x, 100, s2)
    with pytest.raises(C.CodecError):
        C.decode_cm(C.encode_cm(v, i, t, x, 100, s2), 60, 10, True, x, 100, s1)
    # a q8 spec recorded before these fields existed still reads
    old = {"name": "q8", "value_levels": 170, "gamma": 0.5, "index_coding": "bitmap", "target_kl": 7.5e-4}
    assert C.CodecSpec.from_dict(old).codec_version == 1


def test_cm_without_the_compiled_extension(tmp_path, ext):
    """Without the extension (RAYDISTILL_DISABLE_EXT=1) new cm caches are written in version 1 (which decodes in
    NumPy), and a version-2 stream gives a CodecError saying what is missing."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng()
    v, i, t, x = _context_rows(rng, 40, 100, 10)
    spec = C.CodecSpec(name="cm").resolved(10, 100)
    assert spec.codec_version == 2
    np.savez(tmp_path / "s.npz", s=C.encode_cm(v, i, t, x, 100, spec), x=x, v=v, i=i, t=t)
    code = (
        "import numpy as np, pytest\n"
        "from raydistill.data import topk_codec as C\n"
        f"d = np.load({str(tmp_path / 's.npz')!r})\n"
        "spec = C.CodecSpec(name='cm').resolved(10, 100)\n"
        "assert spec.codec_version == 1, spec\n"
        "dv, di, dt = C.decode_cm(C.encode_cm(d['v'], d['i'], d['t'], d['x'], 100, spec), 40, 10, True, d['x'], 100, "
        "spec)\n"
        "assert (di == np.sort(d['i'], 1)).all()\n"
        "v2 = C.CodecSpec(name='cm', codec_version=2).resolved(10, 100)\n"
        "with pytest.raises(C.CodecError, match='compiled extension, which is not loaded .*build-ext'):\n"
        "    C.decode_cm(d['s'], 40, 10, True, d['x'], 100, v2)\n"
    )
    env = dict(os.environ, RAYDISTILL_DISABLE_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
