r"""The ``cm`` codec's entropy coder: q8's codes (the same ids, the same quantised values at the same levels)
range-coded under an adaptive context model, one stream per shard.

Why a model of our own: the order-0 entropy of the top-k set is ~56 bytes a token on ``lm_default`` (k = 128,
V = 1024) and generic compressors (zstd, brotli) reach ~52; the teacher's top-k set and values after the same
*input token* are far more alike than those at neighbouring positions, a dependence that no byte-oriented
compressor sees. Measured ideal code lengths and the model search are in ``benchmarks/results/NOTES.md``
(issue 23).

The model (``model_version`` 1). Tokens are coded in chunks of ``chunk_tokens`` consecutive tokens of the shard
(row-major); within a chunk every probability comes from the shard's header and the chunks before it, so one
chunk is decoded with a few vectorised NumPy steps and a few hundred calls of ``constriction``'s range
decoder (one per probability class / context, each over all the chunk's symbols of that class). For a token
with input id ``x`` (the input token at that position; 0 for tasks without input ids):

* header: a CRC-32 of the rest of the stream, the number of tokens, a CRC-32 of the input ids; per vocabulary
  id ``v`` its membership rate in the shard (uint16) and its mean code (uint8);
* ``tail`` (when the cache has one): its byte, from the counts of the tails coded so far;
* ``anchor``: the token's lower-median value code (an extra symbol; it tells how flat the distribution is),
  from the counts of anchors so far;
* ids: for each ``v`` one membership bit, ``P(v | x) = (n(x, v) + A p_0(v)) / (n(x) + A)``, ``n`` counting the
  chunks before; the probabilities are grouped into ~130 classes (integer arithmetic only, so encoder and
  decoder agree on every machine) and each class coded with one Bernoulli model;
* values: q8's code of each member, from adaptive counts per context (the mean code of ``v`` after ``x`` so
  far, blended with its shard mean, in ``NB`` buckets x how often ``v`` followed ``x`` x ``P(v | x)`` bucket x
  the anchor).

Every probability is an integer count scaled by an exact constant, or one IEEE division of such numbers, so
the encoder and the decoder compute bit-identical models; no transcendental function is involved.

Model version 2 (what new caches are written with): the same header, contexts and counts, coded symbol by
symbol, token by token, by one call of the compiled op ``raydistill::topk_cm_encode`` / ``topk_cm_decode``
(``csrc/topk_cm/topk_cm_cpu.cpp``) with its own range coder instead of ``constriction``'s: a membership
bit at its probability on a 2^-16 grid (integer arithmetic, no classes needed), the ids of a token in
ascending order until k are set (or every id left must be), the values at their counts. The stream is
``CRC-32 | n | inputs CRC-32 | version (2) | header | range-coded bytes``. Version-1 streams still decode
here (NumPy + ``constriction``).
"""

from __future__ import annotations

import zlib

import numpy as np

from raydistill.errors import CodecError

MODEL_VERSION = 2      # what encode() writes unless told otherwise
MODEL_VERSIONS = (1, 2)
MAX_VOCAB = 4096       # the (input id x vocabulary id) count tables are V x V
A_MEMBER = 2.0         # pseudo-count of the shard prior in P(v | x)
B_VALUE = 1.0          # pseudo-count of the shard mean in the predicted code
W_COUNT = 50           # categorical probabilities ~ W_COUNT * count + 1 (a pseudo-count of 1 / W_COUNT)
NB, NCB, NP, NA = 16, 4, 4, 16   # value contexts: predicted-code buckets, count buckets, P buckets, anchors
P_BITS = 16            # membership probabilities are classed on a 2^-16 grid


def _classes() -> tuple[np.ndarray, np.ndarray]:
    """``(class of floor(p * 2^16) for p in [0, 1], class representative probability)``: a log-like grid in the
    distance to 0 or 1 (exponent and two mantissa bits), by integer arithmetic."""
    one = 1 << P_BITS
    cls = np.empty(one + 1, np.int64)
    keys = {}
    for q in range(one + 1):
        side = q > one // 2
        d = one - q if side else q
        e = d.bit_length()
        m = (d >> (e - 3)) & 3 if e >= 3 else d
        key = (side, e, m)
        cls[q] = keys.setdefault(key, len(keys))
    lo = np.full(len(keys), one + 1, np.int64)
    hi = np.full(len(keys), -1, np.int64)
    np.minimum.at(lo, cls, np.arange(one + 1))
    np.maximum.at(hi, cls, np.arange(one + 1))
    rep = ((lo + hi + 1) / 2.0) / one
    assert len(keys) < 256
    return cls.astype(np.uint8), np.clip(rep, 0.5 / one, 1 - 0.5 / one)


_CLS, _REP = _classes()


def _anchor(codes: np.ndarray) -> np.ndarray:
    k = codes.shape[1]
    return np.sort(codes, axis=1)[:, (k - 1) // 2].astype(np.int64)


class _Model:
    """The adaptive state shared by the encoder and the decoder."""

    def __init__(self, vocab_size: int, n_inputs: int, levels: int, p0: np.ndarray, m0: np.ndarray):
        V = vocab_size
        self.V, self.L = V, levels
        self.c1 = np.zeros(n_inputs * V, np.int64)     # n(x, v)
        self.s1 = np.zeros(n_inputs * V, np.float64)   # sum of v's codes after x (exact integers)
        self.cn = np.zeros(n_inputs, np.int64)         # n(x)
        self.p0 = p0
        self.m0 = m0
        self.h_tail = np.zeros(256, np.int64)
        self.h_anchor = np.zeros(levels, np.int64)
        self.h_value = np.zeros((NB * NCB * NP * NA, levels), np.int64)

    @staticmethod
    def categorical(counts: np.ndarray):
        import constriction

        return constriction.stream.model.Categorical(counts * float(W_COUNT) + 1.0, perfect=False)

    def member_p(self, x: np.ndarray) -> np.ndarray:
        V = self.V
        rows = self.c1.reshape(-1, V)[x]
        return (rows + A_MEMBER * self.p0[None, :]) / (self.cn[x][:, None] + A_MEMBER)

    def value_ctx(self, x, idx, p, anchor):
        flat = x[:, None] * self.V + idx
        cnt = self.c1[flat]
        pred = (self.s1[flat] + B_VALUE * self.m0[idx]) / (cnt + B_VALUE)
        pb = np.minimum((pred * (NB / self.L)).astype(np.int64), NB - 1)
        cb = (cnt >= 1).astype(np.int64) + (cnt >= 3) + (cnt >= 7)
        pm = np.take_along_axis(p, idx, 1)
        qb = (pm < 0.5).astype(np.int64) + (pm < 0.25) + (pm < 0.125)
        ab = np.minimum(anchor, NA - 1)[:, None]
        return (((pb * NCB + cb) * NP + qb) * NA + ab).astype(np.uint16)  # < 2^16: a radix sort in _groups

    def update(self, x, idx, codes, anchor, tail):
        flat = (x[:, None] * self.V + idx).reshape(-1)
        size = len(self.c1)
        self.c1 += np.bincount(flat, minlength=size)
        self.s1 += np.bincount(flat, weights=codes.reshape(-1).astype(np.float64), minlength=size)
        self.cn += np.bincount(x, minlength=len(self.cn))
        self.h_anchor += np.bincount(anchor, minlength=self.L)
        if tail is not None:
            self.h_tail += np.bincount(tail, minlength=256)


def _member_classes(p: np.ndarray) -> np.ndarray:
    return _CLS[(p * (1 << P_BITS)).astype(np.int32)]  # p >= 0: truncation is floor


def _groups(keys: np.ndarray):
    """Stable order of ``keys`` and the (key, start, stop) runs in it."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    cut = np.flatnonzero(np.diff(sk)) + 1
    starts = np.r_[0, cut]
    stops = np.r_[cut, len(sk)]
    return order, sk[starts] if len(sk) else sk[:0], starts, stops


def _inputs_crc(x: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(x, "<i8").view(np.uint8))


def _header(idx: np.ndarray, codes: np.ndarray, V: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(idx)
    cnt = np.bincount(idx.reshape(-1), minlength=V)
    tot = np.bincount(idx.reshape(-1), weights=codes.reshape(-1).astype(np.float64), minlength=V)
    q0 = (cnt * 65535) // max(n, 1)
    m0 = np.where(cnt > 0, np.rint(tot / np.maximum(cnt, 1)), 0).astype(np.int64)
    return q0.astype("<u2"), np.minimum(m0, 255).astype(np.uint8), cnt


def _priors(q0: np.ndarray, m0: np.ndarray):
    return (q0.astype(np.float64) + 1.0) / 65537.0, m0.astype(np.float64)


def default_version() -> int:
    """The model version new streams are written in: 2 where the compiled extension loads, else 1 (slower to
    read, but readable without it)."""
    from raydistill._build import load_extension

    return MODEL_VERSION if load_extension().loaded else 1


def _ops():
    """``torch.ops.raydistill`` with the compiled cm ops, or :class:`CodecError` saying why not."""
    import torch

    from raydistill._build import load_extension

    st = load_extension()
    if not st.loaded:
        raise CodecError(f"cm version 2 is coded by raydistill's compiled extension, which is not loaded "
                         f"({st.reason}); run `raydistill build-ext`")
    return torch.ops.raydistill


def _tensor(a: np.ndarray, dtype):
    """A torch view of ``a`` as a contiguous ``dtype`` array (a copy when it is read-only, e.g. arrow's)."""
    import torch

    a = np.ascontiguousarray(a, dtype)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def encode(idx: np.ndarray, codes: np.ndarray, tail: np.ndarray | None, x: np.ndarray, vocab_size: int,
           levels: int, chunk_tokens: int, version: int = MODEL_VERSION) -> np.ndarray:
    """One shard's stream (uint8): ``idx`` ``(n, k)`` ascending ids, ``codes`` their q8 codes, ``tail`` the tail
    bytes ``(n,)`` or None, ``x`` the input id of each token; in model ``version`` 1 or 2."""
    V = vocab_size
    n, k = idx.shape
    if version not in MODEL_VERSIONS:
        raise ValueError(f"cm model version must be one of {list(MODEL_VERSIONS)}, got {version!r}")
    if n and (int(x.min()) < 0 or int(x.max()) >= V):
        raise ValueError(f"input ids must be in [0, {V}) (the vocabulary), got [{int(x.min())}, {int(x.max())}]")
    q0, m0b, _ = _header(idx, codes, V)
    if version == 1:
        words = _encode_v1(idx, codes, tail, x, V, levels, chunk_tokens, q0, m0b).view(np.uint8)
        fields = [np.array([n, _inputs_crc(x)], "<u4").view(np.uint8)]
    else:
        t = _tensor(np.zeros(0) if tail is None else tail, np.uint8)
        try:
            words = _ops().topk_cm_encode(_tensor(idx, np.int64), _tensor(codes, np.uint8), t, _tensor(x, np.int64),
                                          _tensor(q0.view(np.int16), np.int16), _tensor(m0b, np.uint8), V, levels,
                                          chunk_tokens, tail is not None).numpy()
        except RuntimeError as exc:  # the op's argument checks
            raise ValueError(str(exc).splitlines()[0]) from None
        fields = [np.array([n, _inputs_crc(x), 2], "<u4").view(np.uint8)]
    body = np.concatenate(fields + [q0.view(np.uint8), m0b, words])
    return np.concatenate([np.array([zlib.crc32(body)], "<u4").view(np.uint8), body])


def _encode_v1(idx, codes, tail, x, V, levels, chunk_tokens, q0, m0b) -> np.ndarray:
    import constriction

    n = len(idx)
    model = _Model(V, V, levels, *_priors(q0, m0b))
    enc = constriction.stream.queue.RangeEncoder()
    bern = constriction.stream.model.Bernoulli
    for a in range(0, n, chunk_tokens):
        b = min(n, a + chunk_tokens)
        xi, ii, cc = x[a:b], idx[a:b], codes[a:b].astype(np.int64)
        ti = None if tail is None else tail[a:b].astype(np.int64)
        if ti is not None:
            enc.encode(ti.astype(np.int32), model.categorical(model.h_tail))
        anc = _anchor(cc)
        enc.encode(anc.astype(np.int32), model.categorical(model.h_anchor))
        p = model.member_p(xi)
        bits = np.zeros(p.shape, np.int32)
        np.put_along_axis(bits, ii, 1, 1)
        order, keys, s0, s1 = _groups(_member_classes(p).reshape(-1))
        fb = bits.reshape(-1)[order]
        for c, u, w in zip(keys, s0, s1):
            enc.encode(fb[u:w], bern(float(_REP[c]), perfect=False))
        ctx = model.value_ctx(xi, ii, p, anc).reshape(-1)
        order, keys, s0, s1 = _groups(ctx)
        fc = cc.reshape(-1)[order].astype(np.int32)
        for c, u, w in zip(keys, s0, s1):
            enc.encode(fc[u:w], model.categorical(model.h_value[c]))
        np.add.at(model.h_value, (ctx, cc.reshape(-1)), 1)
        model.update(xi, ii, cc, anc, ti)
    return enc.get_compressed().astype("<u4")


def decode(stream: np.ndarray, n: int, k: int, has_tail: bool, x: np.ndarray, vocab_size: int, levels: int,
           chunk_tokens: int, version: int = MODEL_VERSION) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(idx (n, k) int64 ascending, codes (n, k) uint8, tail bytes (n,) or None)`` of :func:`encode`'s stream
    in model ``version`` (the cache's ``codec_version``); :class:`CodecError` when it does not decode."""
    V = vocab_size
    if version not in MODEL_VERSIONS:
        raise CodecError(f"cm model version {version!r} is not one this raydistill reads ({list(MODEL_VERSIONS)})")
    fixed = 12 if version == 1 else 16
    head = fixed + 3 * V
    if len(stream) < head or (version == 1 and (len(stream) - head) % 4):
        raise CodecError(f"stream of {len(stream)} bytes: expected a {head}-byte header"
                         + (" and whole 32-bit words" if version == 1 else "") + " (truncated?)")
    crc = int(stream[:4].copy().view("<u4")[0])
    if zlib.crc32(stream[4:]) != crc:
        raise CodecError(f"stream of {len(stream)} bytes: CRC-32 mismatch (corrupted or truncated)")
    coded, xcrc = (int(a) for a in stream[4:12].copy().view("<u4"))
    if coded != n:
        raise CodecError(f"the stream holds {coded} tokens, {n} expected")
    if xcrc != _inputs_crc(x):
        raise CodecError("the input ids differ from those the stream was coded with (its context)")
    if version == 2 and int(stream[12:16].copy().view("<u4")[0]) != 2:
        raise CodecError(f"header: model version {int(stream[12:16].copy().view('<u4')[0])} in a stream read as "
                         "cm version 2 (the cache's metadata and its stream disagree)")
    q0 = stream[fixed:fixed + 2 * V].copy().view("<u2")
    m0b = stream[fixed + 2 * V:head]
    if int(m0b.max(initial=0)) >= levels:
        raise CodecError(f"header: a mean code >= the codec's {levels} levels")
    if n and (int(x.min()) < 0 or int(x.max()) >= V):
        raise CodecError(f"input ids outside [0, {V}): [{int(x.min())}, {int(x.max())}]")
    if version == 2:
        try:
            idx, codes, tail = _ops().topk_cm_decode(_tensor(stream[head:], np.uint8), _tensor(x, np.int64),
                                                     _tensor(q0.view(np.int16), np.int16), _tensor(m0b, np.uint8),
                                                     n, k, V, levels, chunk_tokens, has_tail)
        except RuntimeError as exc:  # the op's checks (a stream that ends early or runs on, bad parameters)
            raise CodecError(str(exc).splitlines()[0]) from None
        return idx.numpy(), codes.numpy(), tail.numpy() if has_tail else None
    words = stream[head:].copy().view("<u4").astype(np.uint32)
    model = _Model(V, V, levels, *_priors(q0, m0b))
    try:
        return _decode_chunks(model, words, n, k, has_tail, x, chunk_tokens)
    except (AssertionError, RuntimeError) as exc:  # constriction on a stream that is not ours
        raise CodecError(f"the range decoder failed: {exc}") from None


def _decode_chunks(model: _Model, words: np.ndarray, n: int, k: int, has_tail: bool, x: np.ndarray,
                   chunk_tokens: int):
    import constriction

    V = model.V
    dec = constriction.stream.queue.RangeDecoder(words)
    bern = constriction.stream.model.Bernoulli
    idx = np.empty((n, k), np.int64)
    codes = np.empty((n, k), np.uint8)
    tail = np.empty(n, np.uint8) if has_tail else None
    for a in range(0, n, chunk_tokens):
        b = min(n, a + chunk_tokens)
        xi, m = x[a:b], b - a
        ti = None
        if has_tail:
            ti = dec.decode(model.categorical(model.h_tail), m).astype(np.int64)
            tail[a:b] = ti
        anc = dec.decode(model.categorical(model.h_anchor), m).astype(np.int64)
        p = model.member_p(xi)
        order, keys, s0, s1 = _groups(_member_classes(p).reshape(-1))
        fb = np.empty(len(order), np.int32)
        for c, u, w in zip(keys, s0, s1):
            fb[u:w] = dec.decode(bern(float(_REP[c]), perfect=False), int(w - u))
        bits = np.empty(len(order), bool)
        bits[order] = fb.astype(bool)
        bits = bits.reshape(m, V)
        count = bits.sum(1)
        if (count != k).any():
            t = int(np.flatnonzero(count != k)[0])
            raise CodecError(f"token {a + t}: {int(count[t])} ids decoded, expected k={k}")
        ii = np.flatnonzero(bits.reshape(-1)).reshape(m, k) - (np.arange(m) * V)[:, None]
        ctx = model.value_ctx(xi, ii, p, anc).reshape(-1)
        order, keys, s0, s1 = _groups(ctx)
        fc = np.empty(len(order), np.int64)
        for c, u, w in zip(keys, s0, s1):
            fc[u:w] = dec.decode(model.categorical(model.h_value[c]), int(w - u))
        cc = np.empty(len(order), np.int64)
        cc[order] = fc
        cc = cc.reshape(m, k)
        idx[a:b], codes[a:b] = ii, cc
        np.add.at(model.h_value, (ctx, cc.reshape(-1)), 1)
        model.update(xi, ii, cc, anc, ti)
    return idx, codes, tail
