r"""Codecs for offline top-k teacher outputs: per token, the teacher's k largest log-probabilities, their
vocabulary ids and (optionally) the log of its probability mass outside them (the *tail*).

What a token's entry means, whatever the codec:

* ``values`` ``(k,)``: the teacher's log-probabilities at temperature 1, :math:`\log p_j = t_j - \mathrm{LSE}(t)`
  over the full vocabulary (any common shift of a row is the same distribution to ``kd_loss_topk``, which
  applies the loss temperature itself).
* ``indices`` ``(k,)``: their vocabulary ids, distinct; decoded **sorted ascending** (not by value).
* ``tail`` (optional, one per token): :math:`\log R_T`, the log of the teacher's mass outside the k ids at the
  cache's ``tail_temperature`` T, :math:`R_T = 1 - \sum_j \mathrm{softmax}(t/T)_j`. Unlike the values it
  depends on the temperature and cannot be rescaled from the top-k alone, so a cache is read with its tail
  only by a loss at that same temperature (``raydistill.data.topk_cache`` refuses anything else).

Codecs (the name and parameters are recorded in every shard, see ``topk_cache``):

``raw``
    float32 values, int32 ids, float32 tail: exact (12 bytes an entry before parquet's compression).

``cm`` (what ``auto``, the default of ``raydistill teacher-logits``, picks for a vocabulary of at most
``CM_MAX_VOCAB`` ids; ``q8`` above)
    q8's codes (ids, values at ``value_levels``, tail byte), range-coded under an adaptive context model over
    a shard's tokens in order, conditioned on each token's input id (``raydistill.data.topk_cm``): one stream
    per shard, decoded whole (:func:`encode_cm`, :func:`decode_cm`; ``codec_version`` 2: one compiled call
    each way, 1: NumPy + constriction, still read). Decoded values are bit-identical to q8's at the same
    levels.

``q8``
    * ids: sorted per token, then either a bitmap of the vocabulary (``V / 8`` bytes a token; used when
      ``V <= 8 k``) or their gaps (``id_j - id_{j-1} - 1``) as LEB128 varints (one byte for gaps below 128);
    * values: one byte each, :math:`c = \mathrm{round}((L - 1)\, p^{\gamma})` with ``L = value_levels``
      levels and the companding exponent ``gamma``; decoded at the level's value (code 0, the bin
      :math:`p^\gamma < 1/(2(L-1))`, at a quarter step).
      Why :math:`p^\gamma`: an error :math:`e_j` in :math:`\log p_j` adds about :math:`\frac12 \sum_j p_j
      e_j^2` to KL(exact || decoded); uniform steps in :math:`p^{1/2}` make every entry's share equal, which
      minimises the bits for a given KL (at a loss temperature T the weights are :math:`p^{1/T}` and
      :math:`\gamma = 1/(2T)` is the match). Then :math:`\mathrm{KL} \approx k / (6 (L-1)^2)` whatever the
      teacher: ``value_levels=None`` picks the smallest L that gives ``target_kl`` (at least 64, at most
      256).
    * tail: one byte, :math:`\mathrm{round}(255 \sqrt{R})`; code 0 (:math:`R < 3.8 \cdot 10^{-6}`) decodes
      at a quarter step (:math:`R \approx 10^{-6}`). No tail is written when k equals the vocabulary.

Everything is vectorised NumPy over all tokens of a batch; :func:`encode` returns per-token byte
strings that ``topk_cache`` groups per parquet row, :func:`decode` takes them back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from raydistill.errors import CodecError

CODECS = ("auto", "cm", "q8", "raw")  # auto: cm when the vocabulary allows (CM_MAX_VOCAB), else q8
CODEC_VERSIONS = {"auto": (1,), "cm": (1, 2), "q8": (1,), "raw": (1,)}  # the versions of each codec read here
INDEX_CODINGS = ("auto", "bitmap", "gaps")
DEFAULT_TARGET_KL = 7.5e-4
TAIL_LEVELS = 256
CM_MAX_VOCAB = 4096  # cm's (input id x vocabulary id) count tables are V x V
MIN_AUTO_LEVELS = 64  # value_levels=None never goes below (small k: a few bytes a token either way)


@dataclass(frozen=True)
class CodecSpec:
    """A codec and its parameters, as recorded in a cache's metadata."""

    name: str = "q8"
    value_levels: int | None = None   # q8: levels per value (2..256); None: from target_kl and k
    gamma: float = 0.5                # q8: companding exponent (u = p ** gamma); 1 / (2 T) suits a loss at T
    index_coding: str = "auto"        # q8: auto | bitmap | gaps
    target_kl: float = DEFAULT_TARGET_KL  # q8: the KL(exact || decoded) value_levels=None aims at
    chunk_tokens: int = 1024          # cm: tokens coded with one model state (the model adapts between chunks)
    codec_version: int | None = None  # the codec's format version (cm: its model, topk_cm.MODEL_VERSION); None:
    #                                   the newest (resolved() fixes it; metadata without it is version 1)

    def __post_init__(self):
        if self.name not in CODECS:
            raise ValueError(f"codec must be one of {list(CODECS)}, got {self.name!r}")
        if self.value_levels is not None and (isinstance(self.value_levels, bool)
                                              or not isinstance(self.value_levels, int)
                                              or not 2 <= self.value_levels <= 256):
            raise ValueError(f"value_levels must be an int in [2, 256] (one byte a value) or None, got "
                             f"{self.value_levels!r}")
        if not (isinstance(self.gamma, (int, float)) and 0 < float(self.gamma) <= 1):
            raise ValueError(f"gamma must be a number in (0, 1], got {self.gamma!r}")
        if self.index_coding not in INDEX_CODINGS:
            raise ValueError(f"index_coding must be one of {list(INDEX_CODINGS)}, got {self.index_coding!r}")
        if not (isinstance(self.target_kl, (int, float)) and float(self.target_kl) > 0):
            raise ValueError(f"target_kl must be a number > 0, got {self.target_kl!r}")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be an int >= 1, got {self.chunk_tokens!r}")
        if self.codec_version is not None and self.codec_version not in CODEC_VERSIONS[self.name]:
            raise ValueError(f"codec {self.name!r} version {self.codec_version!r} is not supported by this raydistill "
                             f"(it reads versions {list(CODEC_VERSIONS[self.name])}); rewrite the cache with "
                             "`raydistill teacher-logits` or upgrade raydistill")

    def resolved(self, k: int, vocab_size: int) -> "CodecSpec":
        """The spec with ``value_levels``, ``index_coding`` and ``codec_version`` fixed for this k and vocabulary
        (cm: version 2, the compiled coder, where raydistill's extension loads, else 1)."""
        if self.name == "raw":
            return replace(self, codec_version=self.codec_version or 1)
        if self.name == "auto":
            return replace(self, name="cm" if vocab_size <= CM_MAX_VOCAB else "q8").resolved(k, vocab_size)
        if self.name == "cm" and vocab_size > CM_MAX_VOCAB:
            raise ValueError(f"codec 'cm' models every vocabulary id after every input id (V x V counts): it takes "
                             f"a vocabulary of at most {CM_MAX_VOCAB}, this one has {vocab_size}; use 'q8'")
        levels = self.value_levels
        if levels is None:  # KL ~ k / (6 (L-1)^2)
            levels = int(min(256, max(MIN_AUTO_LEVELS, math.ceil(math.sqrt(k / (6.0 * self.target_kl))) + 1)))
        coding = self.index_coding
        if coding == "auto":
            coding = "bitmap" if vocab_size <= 8 * k else "gaps"
        if self.name == "cm":
            coding = "bitmap"  # cm codes one membership bit per vocabulary id
        version = self.codec_version
        if version is None:
            from raydistill.data import topk_cm

            version = topk_cm.default_version() if self.name == "cm" else CODEC_VERSIONS[self.name][-1]
        return CodecSpec(self.name, levels, float(self.gamma), coding, float(self.target_kl), int(self.chunk_tokens),
                         int(version))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodecSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown codec parameters {sorted(unknown)}")
        return cls(**{"codec_version": 1, **d})  # metadata written before the field existed: version 1


# --------------------------------------------------------------------------------------------------
# the teacher side: exact top-k log-probabilities and tail from full logits (torch, in the teacher actor)

def topk_from_logits(logits, k: int, tail_temperature: float | None):
    """``(values, indices, tail)`` of ``(..., V)`` teacher logits (a torch tensor): the k largest
    log-probabilities at temperature 1 (float32), their ids (int64) and, when ``tail_temperature`` is given,
    the log of the mass outside them at that temperature (float32, ``-inf`` when k == V); else None."""
    import torch

    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    top, idx = x.topk(k, dim=-1)
    values = top - lse
    tail = None
    if tail_temperature is not None:
        xt = x / float(tail_temperature)
        outside = xt.scatter(-1, idx, float("-inf"))
        tail = torch.logsumexp(outside, dim=-1) - torch.logsumexp(xt, dim=-1)
    return values, idx, tail


# --------------------------------------------------------------------------------------------------
# LEB128 varints (vectorised)

def _varint_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative ints -> (bytes, byte count per value)."""
    x = x.astype(np.uint64, copy=False)
    nb = np.ones(x.shape, np.int64)
    for j in range(1, 10):
        nb += x >= (np.uint64(1) << np.uint64(7 * j))
    start = np.cumsum(nb) - nb
    out = np.empty(int(nb.sum()), np.uint8)
    for j in range(int(nb.max()) if len(nb) else 0):
        m = nb > j
        byte = (x[m] >> np.uint64(7 * j)) & np.uint64(0x7F)
        cont = (nb[m] > j + 1).astype(np.uint64) << np.uint64(7)
        out[start[m] + j] = (byte | cont).astype(np.uint8)
    return out, nb


def _varint_decode(b: np.ndarray, count: int) -> np.ndarray:
    """``count`` LEB128 values from ``b`` (which must hold exactly them)."""
    if count == 0:
        if len(b):
            raise CodecError(f"{len(b)} bytes of index gaps where none were expected")
        return np.zeros(0, np.int64)
    last = (b & 0x80) == 0
    ends = np.flatnonzero(last)
    if len(ends) != count or not last[-1]:
        raise CodecError(f"index gaps: {len(ends)} complete varints in {len(b)} bytes, expected {count}")
    starts = np.r_[0, ends[:-1] + 1]
    pos = np.arange(len(b)) - np.repeat(starts, ends - starts + 1)
    if pos.max() > 8:
        raise CodecError("index gaps: a varint longer than 9 bytes")
    contrib = (b & 0x7F).astype(np.int64) << (7 * pos)
    return np.add.reduceat(contrib, starts)


# --------------------------------------------------------------------------------------------------
# encode / decode

def _levels(spec: CodecSpec) -> int:
    assert spec.value_levels is not None, "resolve the spec first (CodecSpec.resolved)"
    return int(spec.value_levels)


def _version(spec: CodecSpec) -> int:
    assert spec.codec_version is not None, "resolve the spec first (CodecSpec.resolved)"
    return int(spec.codec_version)


def encode_values(values: np.ndarray, spec: CodecSpec) -> np.ndarray:
    """q8 codes (uint8, same shape) of log-probabilities (``<= 0``)."""
    top = _levels(spec) - 1
    u = np.exp(np.minimum(values.astype(np.float64), 0.0) * spec.gamma)
    return np.clip(np.rint(u * top), 0, top).astype(np.uint8)


def decode_values(codes: np.ndarray, spec: CodecSpec) -> np.ndarray:
    """Log-probabilities (float32) of q8 codes."""
    top = _levels(spec) - 1
    table = np.arange(256, dtype=np.float64) / top
    table[0] = 0.25 / top
    table = (np.log(table) / spec.gamma).astype(np.float32)
    if codes.size and int(codes.max()) > top:
        raise CodecError(f"value code {int(codes.max())} outside the codec's {top + 1} levels")
    return table[codes]


def encode_tail(tail: np.ndarray) -> np.ndarray:
    r = np.exp(np.minimum(tail.astype(np.float64), 0.0))
    return np.clip(np.rint(np.sqrt(r) * (TAIL_LEVELS - 1)), 0, TAIL_LEVELS - 1).astype(np.uint8)


def decode_tail(codes: np.ndarray) -> np.ndarray:
    table = np.arange(TAIL_LEVELS, dtype=np.float64) / (TAIL_LEVELS - 1)
    table[0] = 0.25 / (TAIL_LEVELS - 1)  # R < 3.8e-6: a quarter step, never 0 (KL(exact || decoded) stays finite)
    return (2.0 * np.log(table)).astype(np.float32)[codes]


def encode_indices(indices: np.ndarray, vocab_size: int, spec: CodecSpec) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids of ``(n, k)`` tokens -> (bytes, bytes per token)."""
    n, k = indices.shape
    if spec.index_coding == "bitmap":
        bits = np.zeros((n, vocab_size), bool)
        np.put_along_axis(bits, indices.astype(np.int64), True, axis=1)
        packed = np.packbits(bits, axis=1)
        return packed.reshape(-1), np.full(n, packed.shape[1], np.int64)
    gaps = np.diff(indices.astype(np.int64), axis=1, prepend=-1) - 1
    b, nb = _varint_encode(gaps.reshape(-1))
    return b, nb.reshape(n, k).sum(1)


def decode_indices(b: np.ndarray, n: int, k: int, vocab_size: int, spec: CodecSpec) -> np.ndarray:
    """``(n, k)`` int64 ids, ascending per token."""
    if spec.index_coding == "bitmap":
        width = (vocab_size + 7) // 8
        if len(b) != n * width:
            raise CodecError(f"index bitmap: {len(b)} bytes for {n} tokens, expected {n * width} "
                             f"({width} a token for a vocabulary of {vocab_size})")
        bits = np.unpackbits(b.reshape(n, width), axis=1, count=vocab_size).view(bool)
        pos = np.flatnonzero(bits)  # row-major: ascending within each token
        if len(pos) != n * k:
            counts = bits.sum(1)
            t = int(np.flatnonzero(counts != k)[0])
            raise CodecError(f"index bitmap: token {t} has {int(counts[t])} ids set, expected k={k}")
        idx = pos.reshape(n, k) - (np.arange(n, dtype=np.int64) * vocab_size)[:, None]
        if n and ((idx[:, 0] < 0) | (idx[:, -1] >= vocab_size)).any():  # k ids in total but not k per token
            counts = bits.sum(1)
            t = int(np.flatnonzero(counts != k)[0])
            raise CodecError(f"index bitmap: token {t} has {int(counts[t])} ids set, expected k={k}")
        return idx
    gaps = _varint_decode(b, n * k).reshape(n, k)
    idx = np.cumsum(gaps + 1, axis=1) - 1
    if n and (idx[:, -1] >= vocab_size).any():
        raise CodecError(f"index gaps: an id >= the vocabulary size {vocab_size}")
    return idx


def encode(values: np.ndarray, indices: np.ndarray, tail: np.ndarray | None, vocab_size: int,
           spec: CodecSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Encode ``(n, k)`` values / indices (and ``(n,)`` tail) of ``n`` tokens with a resolved q8 ``spec``.

    Returns ``{field: (bytes, bytes per token)}`` for ``indices``, ``values`` and (when given) ``tail``; the
    tokens' entries are sorted by id first."""
    if spec.name != "q8":
        raise ValueError(f"encode() is for the q8 codec, got {spec.name!r}")
    n, k = values.shape
    order = np.argsort(indices, axis=1, kind="stable")
    idx = np.take_along_axis(indices, order, 1)
    vals = np.take_along_axis(values, order, 1)
    out = {"indices": encode_indices(idx, vocab_size, spec),
           "values": (encode_values(vals, spec).reshape(-1), np.full(n, k, np.int64))}
    if tail is not None:
        out["tail"] = (encode_tail(np.asarray(tail).reshape(-1)), np.ones(n, np.int64))
    return out


def decode(payload: dict[str, np.ndarray], n: int, k: int, vocab_size: int, spec: CodecSpec):
    """``(values (n, k) float32, indices (n, k) int64, tail (n,) float32 or None)`` of a q8 payload
    (``{field: all tokens' bytes}``)."""
    idx = decode_indices(payload["indices"], n, k, vocab_size, spec)
    codes = payload["values"]
    if len(codes) != n * k:
        raise CodecError(f"values: {len(codes)} bytes for {n} tokens, expected {n * k} (k={k})")
    vals = decode_values(codes, spec).reshape(n, k)
    tail = None
    if "tail" in payload:
        if len(payload["tail"]) != n:
            raise CodecError(f"tail: {len(payload['tail'])} bytes for {n} tokens, expected {n}")
        tail = decode_tail(payload["tail"])
    return vals, idx, tail


def encode_cm(values: np.ndarray, indices: np.ndarray, tail: np.ndarray | None, inputs: np.ndarray, vocab_size: int,
              spec: CodecSpec) -> np.ndarray:
    """One shard's ``cm`` stream (uint8) of ``(n, k)`` values / indices (and ``(n,)`` tail) of ``n`` tokens in
    shard order; ``inputs`` ``(n,)``: each token's input id (the context the model conditions on; zeros when
    the task has none). The codes are q8's at ``spec.value_levels``."""
    from raydistill.data import topk_cm

    if spec.name != "cm":
        raise ValueError(f"encode_cm() is for the cm codec, got {spec.name!r}")
    order = np.argsort(indices, axis=1, kind="stable")
    idx = np.take_along_axis(indices, order, 1).astype(np.int64)
    codes = encode_values(np.take_along_axis(values, order, 1), spec)
    tcodes = None if tail is None else encode_tail(np.asarray(tail).reshape(-1))
    return topk_cm.encode(idx, codes, tcodes, np.asarray(inputs, np.int64).reshape(-1), vocab_size,
                          _levels(spec), spec.chunk_tokens, _version(spec))


def decode_cm(stream: np.ndarray, n: int, k: int, has_tail: bool, inputs: np.ndarray, vocab_size: int,
              spec: CodecSpec):
    """``(values (n, k) float32, indices (n, k) int64, tail (n,) float32 or None)`` of the first ``n`` tokens of
    a ``cm`` stream (:class:`CodecError` when it does not decode)."""
    from raydistill.data import topk_cm

    if len(inputs) != n:
        raise CodecError(f"{len(inputs)} input ids for {n} tokens")
    idx, codes, tcodes = topk_cm.decode(stream, n, k, has_tail, np.asarray(inputs, np.int64).reshape(-1),
                                        vocab_size, _levels(spec), spec.chunk_tokens, _version(spec))
    return decode_values(codes, spec), idx, None if tcodes is None else decode_tail(tcodes)


# --------------------------------------------------------------------------------------------------
# fidelity

def _log_normalise(a: np.ndarray) -> np.ndarray:
    m = a.max(-1, keepdims=True)
    return a - (m + np.log(np.exp(a - m).sum(-1, keepdims=True)))


def fidelity(values: np.ndarray, indices: np.ndarray, tail: np.ndarray | None, dec_values: np.ndarray,
             dec_indices: np.ndarray, dec_tail: np.ndarray | None, temperature: float = 1.0) -> dict[str, float]:
    """Mean KL(exact || decoded) in nats over tokens, at ``temperature``:

    * ``kl_topk``: the top-k distributions, each renormalised over its k entries (matched by id);
    * ``kl_with_tail`` (when both tails are given): the k + 1 buckets, ``(1 - R) softmax(values / T)`` and
      the tail ``R`` (tails taken as they are, i.e. at the cache's tail temperature).
    """
    T = float(temperature)
    o1, o2 = np.argsort(indices, 1), np.argsort(dec_indices, 1)
    i1, i2 = np.take_along_axis(indices, o1, 1), np.take_along_axis(dec_indices, o2, 1)
    if not np.array_equal(i1, i2):
        return {"kl_topk": math.inf, "kl_with_tail": math.inf}
    a = _log_normalise(np.take_along_axis(values, o1, 1).astype(np.float64) / T)
    b = _log_normalise(np.take_along_axis(dec_values, o2, 1).astype(np.float64) / T)
    out = {"kl_topk": float((np.exp(a) * (a - b)).sum(-1).mean()) if len(a) else 0.0}
    if tail is not None and dec_tail is not None:
        def buckets(lp, t):
            t = t.astype(np.float64)[:, None]
            with np.errstate(divide="ignore"):
                return np.concatenate([lp + np.log(-np.expm1(t)), t], axis=1)
        pa, pb = buckets(a, tail), buckets(b, dec_tail)
        with np.errstate(invalid="ignore"):
            terms = np.where(np.isneginf(pa), 0.0, np.exp(pa) * (pa - pb))
        out["kl_with_tail"] = float(terms.sum(-1).mean()) if len(a) else 0.0
    return out
