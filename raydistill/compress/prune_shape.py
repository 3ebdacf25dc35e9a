"""Prune a transformers decoder LM to a target shape (the Minitron recipe: Muralidharan et al. 2024,
arXiv 2407.14679; Sreenivas et al. 2024, arXiv 2408.11796): layers, hidden size, attention heads, KV
heads and MLP intermediate size, each ranked by importance on a calibration set.

**Order.** Every score is computed on the ORIGINAL model: the depth ranking first (block importance in
one forward, or one forward per candidate for the perplexity ranking), then one forward for all width
scores (norm outputs, head outputs, MLP units) of the layers that stay. Then the kept sets are fixed and
applied: layers, heads, MLP units, channels. Because the kept sets are chosen before anything is removed,
the result does not depend on the order of application; it is one-shot ranking, which Minitron found as
good as iterative pruning, costs one calibration pass (plus the perplexity candidates), and scores every
axis on the model whose knowledge is being kept. The channel scores sum over the norms of the kept layers
only, since the removed layers' readers are gone.

**Target** (:func:`resolve_target`): a dict (or a transformers config / its dict: the shape keys are
read, the others ignored with ``strict=False``) of ``num_hidden_layers``, ``hidden_size``,
``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` (and ``head_dim``, which must
equal the model's: pruning keeps the head size). An int is an absolute size, a float in (0, 1] the
fraction kept (rounded, at least 1). Missing axes stay. ``num_key_value_heads`` missing: multi-head
attention stays multi-head (KV heads = heads), grouped attention keeps its KV heads.

Public API::

    prune_to_shape(model, target, calibration, *, depth_ranking="block_importance", width_ranking="activation",
                   contiguous=False, pad_id=None, batch_size=8, seed=0) -> ShapeReport
    resolve_target(model, target) -> dict           # the absolute target shape, checked
    check_prune_target(model_or_config, target, key="student.init") -> dict   # + model_type / config rules
    model_shape(model_or_config) -> dict
    student_target(teacher_model, student_config) -> (target, notes)   # a student config as a pruning target
    make_student_from_teacher(teacher_model, target, calibration, **kw) -> (student, ShapeReport)
    shape_for_params(model_or_config, params, num_hidden_layers=None) -> dict   # width solved for a size
    config_params(model_or_config, shape=None) -> int                         # parameters of a (pruned) shape
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from raydistill.compress.structured_depth import (DEPTH_RANKINGS, check_depth_model, drop_layers, layer_scores,
                                                  select_layers)
from raydistill.compress.structured_lm import (DEPTH_MODEL_TYPES, PER_LAYER_CONFIG_KEYS, WIDTH_MODEL_TYPES,
                                               check_batch_size,
                                               check_calibration, decoder_layers, decoder_lm, rebuild_check)
from raydistill.compress.structured_width import (WIDTH_RANKINGS, activation_stats, check_width_layout,
                                                  prune_heads, prune_hidden, prune_mlp, random_scores, select_heads)
from raydistill.compress.structured import StructuredReport, _heads, _top, prune_units

__all__ = ["SHAPE_KEYS", "ShapeReport", "prune_to_shape", "resolve_target", "check_prune_target", "model_shape",
           "pruned_config", "student_target", "make_student_from_teacher", "shape_for_params", "config_params"]

SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "head_dim")
_WIDTH_KEYS = SHAPE_KEYS[1:]


@dataclass
class ShapeReport:
    """What :func:`prune_to_shape` did: shapes, rankings, what was removed (original indices) and the scores."""

    shape_before: dict
    shape_after: dict
    depth_ranking: str
    width_ranking: str
    contiguous: bool
    removed_layers: list[int] = field(default_factory=list)
    layer_scores: dict = field(default_factory=dict)   # {candidates, scores[, nll]} (depth pruned only)
    kept_channels: list[int] = field(default_factory=list)
    channel_scores: list[float] = field(default_factory=list)
    kept_heads: dict = field(default_factory=dict)     # {original layer: {"query": [...], "kv": [...]}}
    kept_units: dict = field(default_factory=dict)     # {original layer: [...]} (intermediate units)
    params_before: int = 0
    params_after: int = 0
    notes: list[str] = field(default_factory=list)  # how a student config was mapped to the target

    def to_dict(self) -> dict:
        return asdict(self)


def _config(x):
    """The transformers config of a model (inside any wrapper), a config object, or a config dict (with
    ``model_type``; built with ``AutoConfig.for_model``)."""
    from raydistill.utils import unwrap_model

    if isinstance(x, nn.Module):
        return unwrap_model(x).config
    if isinstance(x, dict):
        from transformers import AutoConfig

        d = dict(x)
        if "model_type" not in d:
            raise ValueError("a config dict needs model_type (e.g. llama)")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if not hasattr(x, "to_dict"):
        raise TypeError(f"expected a transformers model, config or config dict, got {type(x).__name__}")
    return x


def model_shape(model) -> dict:
    """The shape keys of a transformers LM's config (a model, config or config dict; ``head_dim`` as the
    attention uses it)."""
    c = _config(model)
    out = {k: getattr(c, k, None) for k in SHAPE_KEYS[:-1]}
    out["head_dim"] = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def _target_dict(target, strict: bool, key: str = "target") -> dict:
    if hasattr(target, "to_dict") and not isinstance(target, dict):
        target = target.to_dict()
    if not isinstance(target, dict):
        raise TypeError(f"{key} must be a dict of shape keys {SHAPE_KEYS} (or a transformers config), got "
                        f"{type(target).__name__}")
    unknown = sorted(set(target) - set(SHAPE_KEYS))
    if strict and unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; the shape keys are {list(SHAPE_KEYS)}")
    return {k: v for k, v in target.items() if k in SHAPE_KEYS and v is not None}


def resolve_target(model, target, *, strict: bool = True, key: str = "target") -> dict:
    """The absolute target shape (every key of :data:`SHAPE_KEYS`), checked against the shape of ``model``
    (a model, config or config dict): ValueError naming ``<key>.<shape key>`` and the rule."""
    cur = model_shape(model)
    want = _target_dict(target, strict, key)
    out = dict(cur)
    for k, v in want.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{key}.{k} must be an int (a size) or a float in (0, 1] (the fraction kept), got {v!r}")
        if cur[k] is None:
            raise ValueError(f"{key}.{k}: the model's {type(_config(model)).__name__} has no {k}")
        if isinstance(v, float):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{key}.{k}: a float is the fraction kept and must be in (0, 1], got {v}")
            v = max(1, round(v * cur[k]))
        if v < 1:
            raise ValueError(f"{key}.{k} must be at least 1, got {v}")
        if v > cur[k]:
            raise ValueError(f"{key}.{k} {v} is larger than the model's {cur[k]}: pruning only removes")
        out[k] = int(v)
    if "num_key_value_heads" not in want and cur["num_key_value_heads"] == cur["num_attention_heads"]:
        out["num_key_value_heads"] = out["num_attention_heads"]  # multi-head attention stays multi-head
    if out["head_dim"] != cur["head_dim"]:
        raise ValueError(f"{key}.head_dim {out['head_dim']} differs from the model's {cur['head_dim']}: pruning "
                         "removes whole heads and keeps their size (give num_attention_heads instead)")
    h, kv = out["num_attention_heads"], out["num_key_value_heads"]
    if h % kv:
        raise ValueError(f"{key}.num_key_value_heads {kv} does not divide {key}.num_attention_heads {h}")
    g = cur["num_attention_heads"] // cur["num_key_value_heads"]
    if h // kv > g:
        raise ValueError(f"{key}.num_attention_heads / {key}.num_key_value_heads = {h // kv} query heads per KV "
                         f"head, more than the model's {g}: pruning cannot give a KV head more query heads")
    if out["hidden_size"] % h:
        raise ValueError(f"{key}.num_attention_heads {h} does not divide {key}.hidden_size {out['hidden_size']} "
                         "(transformers' Llama-style configs require hidden_size % num_attention_heads == 0)")
    return out


def pruned_config(model, shape: dict) -> dict:
    """The config dict of ``model`` (a model, config or config dict) pruned to ``shape`` (absolute: the keys
    of :data:`SHAPE_KEYS` that change are set, per-layer lists cut to the new depth -- which entries stay is
    chosen by the pruning; the count is what a model built from it needs). No checks:
    :func:`check_prune_target` checks the shape."""
    conf = _config(model)
    cur = model_shape(conf)
    d = conf.to_dict() | {k: shape[k] for k in SHAPE_KEYS if shape.get(k) is not None and shape[k] != cur[k]}
    d.pop("transformers_version", None)
    for pk in PER_LAYER_CONFIG_KEYS:
        if isinstance(d.get(pk), list) and len(d[pk]) == cur["num_hidden_layers"]:
            d[pk] = d[pk][:shape["num_hidden_layers"]]
    return d


def check_prune_target(model, target, *, key: str = "target", strict: bool = True) -> dict:
    """Everything about pruning ``model`` (a model, config or config dict, e.g. a teacher's before it is
    built) to ``target`` that its config decides: the absolute shape (:func:`resolve_target`), the
    ``model_type`` supporting each axis that changes, and the config class accepting the pruned shape (its
    own validation rules). Returns the shape; ValueError naming ``<key>.<shape key>`` otherwise -- a
    pipeline re-raises it as a ConfigError before Ray starts."""
    conf = _config(model)
    shape = resolve_target(conf, target, strict=strict, key=key)
    cur = model_shape(conf)
    changed = [k for k in SHAPE_KEYS if shape[k] != cur[k]]
    types = WIDTH_MODEL_TYPES if set(changed) - {"num_hidden_layers"} else DEPTH_MODEL_TYPES
    if changed and conf.model_type not in types:
        what = "width pruning (hidden size, heads, intermediate size)" if types is WIDTH_MODEL_TYPES else \
            "depth pruning"
        k = next(k for k in changed if k != "num_hidden_layers") if types is WIDTH_MODEL_TYPES else changed[0]
        raise ValueError(f"{key}.{k}: {what} supports model_type {', '.join(types)}, not {conf.model_type!r}")
    if "num_hidden_layers" in changed:
        check_depth_model(conf)
    d = pruned_config(conf, shape)
    try:
        type(conf).from_dict(d)
    except Exception as exc:  # the config class's own validation (strict dataclass, validate_architecture)
        raise ValueError(f"{key}: {type(conf).__name__} rejects the pruned shape "
                         f"{ {k: shape[k] for k in SHAPE_KEYS} }: {exc}") from None
    return shape


def _check_ranking(depth_ranking, width_ranking, contiguous, seed, pad_id) -> None:
    if depth_ranking not in DEPTH_RANKINGS:
        raise ValueError(f"depth_ranking must be one of {DEPTH_RANKINGS}, got {depth_ranking!r}")
    if width_ranking not in WIDTH_RANKINGS:
        raise ValueError(f"width_ranking must be one of {WIDTH_RANKINGS}, got {width_ranking!r}")
    if not isinstance(contiguous, bool):
        raise ValueError(f"contiguous must be a bool (remove one window of consecutive layers), got {contiguous!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int (the random ranking's seed), got {seed!r}")
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
        raise ValueError(f"pad_id must be an int token id or None, got {pad_id!r}")


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def prune_to_shape(model: nn.Module, target, calibration: Tensor, *, depth_ranking: str = "block_importance",
                   width_ranking: str = "activation", contiguous: bool = False, pad_id: int | None = None,
                   batch_size: int = 8, seed: int = 0) -> ShapeReport:
    """Prune ``model`` (a transformers decoder LM; in place) to ``target`` (see :func:`resolve_target`),
    ranking on ``calibration`` (int token ids ``(blocks, seq_len)``; positions holding ``pad_id`` are left
    out of every statistic). ``depth_ranking``: ``block_importance`` | ``perplexity`` | ``random``;
    ``width_ranking``: ``activation`` | ``random``; ``contiguous``: remove one window of consecutive layers
    instead of individually ranked ones; ``seed``: the random rankings'. Returns a :class:`ShapeReport`."""
    base = decoder_lm(model, what="prune_to_shape", model_types=DEPTH_MODEL_TYPES)
    _check_ranking(depth_ranking, width_ranking, contiguous, seed, pad_id)
    batch_size = check_batch_size(batch_size)
    shape = check_prune_target(base, target)
    before = model_shape(base)
    width = any(shape[k] != before[k] for k in _WIDTH_KEYS)
    if width:
        check_width_layout(base)
    n_drop = before["num_hidden_layers"] - shape["num_hidden_layers"]
    calibration = check_calibration(calibration, base)
    rep = ShapeReport(shape_before=before, shape_after=shape, depth_ranking=depth_ranking,
                      width_ranking=width_ranking, contiguous=contiguous, params_before=_params(base))
    gen = torch.Generator().manual_seed(int(seed))

    # ---- scores, all on the original model ------------------------------------------------------------
    removed: list[int] = []
    if n_drop:
        rep.layer_scores = layer_scores(base, calibration, ranking=depth_ranking, n=n_drop, contiguous=contiguous,
                                        pad_id=pad_id, batch_size=batch_size, seed=seed)
        removed = select_layers(rep.layer_scores, n_drop)
    _, _, layers = decoder_layers(base)
    kept_layers = [i for i in range(len(layers)) if i not in removed]
    do = {"channels": shape["hidden_size"] != before["hidden_size"],
          "heads": (shape["num_attention_heads"], shape["num_key_value_heads"]) !=
                   (before["num_attention_heads"], before["num_key_value_heads"]),
          "mlp": shape["intermediate_size"] != before["intermediate_size"]}
    stats = {}
    if width_ranking == "activation" and any(do.values()):
        stats = activation_stats(base, calibration, kept_layers, pad_id=pad_id, batch_size=batch_size, **do)

    # ---- kept sets ------------------------------------------------------------------------------------
    head_keep, unit_keep = {}, {}
    kv_t, h_t = shape["num_key_value_heads"], shape["num_attention_heads"]
    for i in kept_layers if width else []:
        attn, mlp = layers[i].self_attn, layers[i].mlp
        if do["heads"]:
            h, kv, hd = _heads(attn)
            per_q = stats["o_proj"][i].reshape(h, hd).sum(1) if stats else random_scores(h, gen)
            head_keep[i] = select_heads(per_q.reshape(kv, h // kv), kv_t, h_t // kv_t)
            rep.kept_heads[i] = {"query": head_keep[i][0].tolist(), "kv": head_keep[i][1].tolist()}
        if do["mlp"]:
            n = mlp.gate_proj.out_features
            s = stats["down_proj"][i] if stats else random_scores(n, gen)
            unit_keep[i] = _top(s, shape["intermediate_size"])
            rep.kept_units[i] = unit_keep[i].tolist()
    if do["channels"]:
        s = stats["channels"] if stats else random_scores(before["hidden_size"], gen)
        channels = _top(s, shape["hidden_size"])
        rep.kept_channels = channels.tolist()
        rep.channel_scores = s.tolist()

    # ---- apply ------------------------------------------------------------------------------------------
    if removed:
        drop_layers(base, removed)
        rep.removed_layers = removed
    if do["heads"]:
        prune_heads([layers[i].self_attn for i in kept_layers], [head_keep[i] for i in kept_layers], base)
    if do["mlp"]:
        prune_mlp([layers[i].mlp for i in kept_layers], [unit_keep[i] for i in kept_layers], base)
    if do["channels"]:
        prune_hidden(base, channels)
    rebuild_check(base, "prune_to_shape")
    rep.params_after = _params(base)
    return rep


def student_target(teacher_model, student_config) -> tuple[dict, list[str]]:
    """The pruning target for making ``student_config``'s shape from ``teacher_model`` (a model, config or
    config dict): its layers, hidden size, intermediate size and attention. Pruning keeps the teacher's
    head size, so when the student's ``head_dim`` differs, the target keeps the student's attention width
    (heads x head_dim, hence its q/k/v/o parameter count) in heads of the teacher's size. Returns (target,
    notes on any such change)."""
    s = _target_dict(student_config, strict=False)
    s_heads = s.get("num_attention_heads")
    s_kv = s.get("num_key_value_heads") or s_heads
    t = model_shape(teacher_model)
    target = {k: s[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size") if k in s}
    notes = []
    if s_heads:
        s_hd = s.get("head_dim") or s.get("hidden_size", t["hidden_size"]) // s_heads
        if s_hd == t["head_dim"]:
            target |= {"num_attention_heads": s_heads, "num_key_value_heads": s_kv}
        else:
            if (s_heads * s_hd) % t["head_dim"] or (s_kv * s_hd) % t["head_dim"]:
                raise ValueError(f"student config: attention width {s_heads} x {s_hd} (KV {s_kv} x {s_hd}) is not a "
                                 f"whole number of the teacher's heads of head_dim {t['head_dim']}")
            h, kv = s_heads * s_hd // t["head_dim"], s_kv * s_hd // t["head_dim"]
            target |= {"num_attention_heads": h, "num_key_value_heads": kv}
            notes.append(f"student attention {s_heads} heads x head_dim {s_hd} (KV {s_kv}) made as {h} heads x "
                         f"head_dim {t['head_dim']} (KV {kv}): same q/k/v/o shapes, teacher's head size kept")
    return target, notes


def make_student_from_teacher(teacher_model: nn.Module, target, calibration: Tensor, **kwargs):
    """A copy of ``teacher_model`` pruned to ``target`` (a shape dict, or a student config dict / object:
    see :func:`student_target`); the teacher is left unchanged. Returns (student, ShapeReport); the
    report's ``notes`` say how a student config was mapped."""
    notes: list[str] = []
    if hasattr(target, "to_dict") or (isinstance(target, dict) and set(target) - set(SHAPE_KEYS)):
        target, notes = student_target(teacher_model, target)
    from raydistill.utils import unwrap_model

    student = copy.deepcopy(unwrap_model(teacher_model))
    rep = prune_to_shape(student, target, calibration, **kwargs)
    rep.notes = notes
    return student, rep


def config_params(model, shape: dict | None = None) -> int:
    """The parameter count of ``model`` (a model, config or config dict) with the shape keys of ``shape``
    (absolute sizes, e.g. from :func:`resolve_target`) written into its config: the model is built on the
    meta device (no memory, no weights), so the count is exact for any model type (tied embeddings once)."""
    from transformers import AutoModelForCausalLM

    conf = copy.deepcopy(_config(model))
    for k, v in (shape or {}).items():
        setattr(conf, k, int(v))
    for pk in PER_LAYER_CONFIG_KEYS:
        if isinstance(getattr(conf, pk, None), list):
            setattr(conf, pk, getattr(conf, pk)[: conf.num_hidden_layers])
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(conf)
    return _params(net)


def _width(cur: dict, hidden: int) -> dict:
    """The width axes for a hidden size: KV heads, query heads (the model's query heads per KV head kept)
    and intermediate size scaled with ``hidden / cur["hidden_size"]``."""
    w = hidden / cur["hidden_size"]
    g = cur["num_attention_heads"] // cur["num_key_value_heads"]
    kv = min(cur["num_key_value_heads"], max(1, round(cur["num_key_value_heads"] * w)))
    return {"hidden_size": hidden, "num_attention_heads": kv * g, "num_key_value_heads": kv,
            "intermediate_size": min(cur["intermediate_size"], max(1, round(cur["intermediate_size"] * w)))}


_WINDOW = 6  # hidden sizes looked at on each side of where the parameter count crosses the budget


def shape_for_params(model, params, num_hidden_layers=None, *, key: str = "target") -> dict:
    """A target shape of about ``params`` parameters (an int, or a float in (0, 1]: the fraction of the
    model's) at ``num_hidden_layers`` (int or fraction kept; None: the model's): the width axes -- hidden
    size, heads, KV heads, intermediate size -- shrink together by one factor (the query heads per KV head
    kept), and the hidden size whose parameter count (:func:`config_params`) is nearest ``params`` is taken
    among those its head count divides (bisection to where the count crosses ``params``, then the nearest
    of the candidates around it: the head count moves in steps). Searching ``num_hidden_layers`` at a fixed ``params`` trades depth
    for width at equal size. ValueError naming ``<key>.params`` when ``params`` is out of reach at that
    depth (more than the full width has, or less than the narrowest)."""
    if isinstance(params, bool) or not isinstance(params, (int, float)):
        raise ValueError(f"{key}.params must be an int (a parameter count) or a float in (0, 1], got {params!r}")
    cur = model_shape(model)
    layers = resolve_target(model, {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers},
                            key=key)["num_hidden_layers"]
    if isinstance(params, float):
        if not 0.0 < params <= 1.0:
            raise ValueError(f"{key}.params: a float is the fraction of the model's parameters and must be in "
                             f"(0, 1], got {params}")
        params = round(params * config_params(model))
    hiddens = [h for h in range(1, cur["hidden_size"] + 1) if h % _width(cur, h)["num_attention_heads"] == 0]

    def count(h):
        return config_params(model, {"num_hidden_layers": layers, **_width(cur, h)})

    lo, hi = 0, len(hiddens) - 1
    if count(hiddens[hi]) < params * 0.98 or count(hiddens[lo]) > params * 1.02:
        raise ValueError(f"{key}.params: {params:,} parameters are out of reach at {layers} layers: from "
                         f"{count(hiddens[lo]):,} (hidden size {hiddens[lo]}) to {count(hiddens[hi]):,} (the full "
                         f"width); change num_hidden_layers or params")
    while hi - lo > 1:  # the count grows with the hidden size (up to head-count steps): bisect to params
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(hiddens[mid]) <= params else (lo, mid)
    # the head count changes in steps, so the count is not monotone between them: the nearest of the
    # candidates around the crossing
    near = hiddens[max(0, lo - _WINDOW): hi + _WINDOW + 1]
    best = min(near, key=lambda h: (abs(count(h) - params), h))
    return {"num_hidden_layers": layers, **_width(cur, best)}


def _layers_path(base: nn.Module) -> str:
    _, _, layers = decoder_layers(base)
    return next(n for n, m in base.named_modules() if m is layers)


def _renumber(name: str, prefix: str, new_index: dict[int, int]) -> str | None:
    """``<prefix>.<old>.rest`` -> ``<prefix>.<new>.rest`` (None: a removed layer); other names unchanged."""
    if not name.startswith(prefix + "."):
        return name
    idx, _, rest = name[len(prefix) + 1:].partition(".")
    new = new_index.get(int(idx))
    return None if new is None else f"{prefix}.{new}" + (f".{rest}" if rest else "")


def prune_structured(model: nn.Module, ratio: float = 0.5, calibration: Tensor | None = None, *, include=None,
                     exclude=None, head_unit: str = "kv_group", num_layers: int | float | None = None,
                     hidden_size: int | float | None = None, depth_ranking: str = "block_importance",
                     contiguous: bool = False) -> StructuredReport:
    """Remove ``round(ratio * units)`` hidden units of every selected unit pair's first layer and of every
    gated MLP, and ``round(ratio * units)`` attention units (``head_unit``) of every attention module, in
    place: :func:`raydistill.compress.structured.prune_units`.

    ``num_layers`` / ``hidden_size`` (transformers decoder LMs; an int, or a float in (0, 1]: the fraction
    kept) also remove whole decoder layers ranked by ``depth_ranking`` (``contiguous``: one window of
    consecutive layers) and embedding channels ranked by activation, both on ``calibration`` (token ids,
    required) and, like the heads and MLP units, scored on the original model (``ratio=0`` keeps every head
    and unit): :func:`prune_structured_shape`."""
    if num_layers is not None or hidden_size is not None:
        return prune_structured_shape(model, ratio, calibration, include=include, exclude=exclude, head_unit=head_unit,
                                      num_layers=num_layers, hidden_size=hidden_size, depth_ranking=depth_ranking,
                                      contiguous=contiguous)
    return prune_units(model, ratio, calibration, include=include, exclude=exclude, head_unit=head_unit)


@torch.no_grad()
def prune_structured_shape(model: nn.Module, ratio: float, calibration, *, include, exclude, head_unit: str,
                           num_layers, hidden_size, depth_ranking: str, contiguous: bool):
    """:func:`raydistill.compress.prune_structured` with ``num_layers`` / ``hidden_size``: the depth and
    channel scores and the head / MLP-unit scores (``ratio``, as without them) all come from the original
    model; then layers and channels go. Returns its StructuredReport with a ``decoder_layers`` and a
    ``hidden`` entry; ``widths`` renamed to the kept layers' new indices."""
    from raydistill.compress.structured import HEAD_UNITS, _params_bytes, attention_modules

    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be a float in [0, 1) (the fraction of heads / MLP units removed), got {ratio!r}")
    if head_unit not in HEAD_UNITS:
        raise ValueError(f"head_unit must be one of {HEAD_UNITS}, got {head_unit!r}")
    base = decoder_lm(model, what="prune_structured(num_layers=..., hidden_size=...)", model_types=DEPTH_MODEL_TYPES)
    _check_ranking(depth_ranking, "activation", contiguous, 0, None)
    if calibration is None:
        raise ValueError("calibration is required with num_layers / hidden_size: a (blocks, seq_len) tensor of token "
                         "ids to rank layers and channels on")
    calibration = check_calibration(calibration, base)
    cur = model_shape(base)
    want = {"num_hidden_layers": num_layers if num_layers is not None else cur["num_hidden_layers"],
            "hidden_size": hidden_size if hidden_size is not None else cur["hidden_size"]}
    attn_pruned = bool(ratio) and any(n for n in _select_names(attention_modules(base), include, exclude))
    if attn_pruned:
        g = cur["num_attention_heads"] // cur["num_key_value_heads"]
        kv = cur["num_key_value_heads"]
        heads = (kv - round(ratio * kv)) * g if head_unit == "kv_group" else kv * (g - round(ratio * g))
        want |= {"num_attention_heads": heads, "num_key_value_heads": heads // g if head_unit == "kv_group" else kv}
    try:
        shape = check_prune_target(base, want)
    except ValueError as exc:
        raise ValueError(str(exc).replace("target.num_hidden_layers", "num_layers")
                         .replace("target.hidden_size", "hidden_size")) from None
    if shape["hidden_size"] != cur["hidden_size"]:
        check_width_layout(base)
    n_drop = cur["num_hidden_layers"] - shape["num_hidden_layers"]
    params_b, bytes_b = _params_bytes(base)
    scores = layer_scores(base, calibration, ranking=depth_ranking, n=n_drop, contiguous=contiguous) if n_drop else {}
    removed = select_layers(scores, n_drop) if n_drop else []
    kept_layers = [i for i in range(cur["num_hidden_layers"]) if i not in removed]
    channels = None
    if shape["hidden_size"] != cur["hidden_size"]:
        s = activation_stats(base, calibration, kept_layers, channels=True, heads=False, mlp=False)["channels"]
        channels = _top(s, shape["hidden_size"])
    if ratio:
        rep = prune_units(model, ratio, calibration, include=include, exclude=exclude, head_unit=head_unit)
    else:
        rep = StructuredReport(ratio=0.0, ranking="activation")
    prefix = _layers_path(base)
    if removed:
        drop_layers(base, removed)
        new_index = {old: new for new, old in enumerate(kept_layers)}
        rep.layers = [r | {"name": n} for r in rep.layers if (n := _renumber(r["name"], prefix, new_index))]
        rep.widths = {n: w for k, w in rep.widths.items() if (n := _renumber(k, prefix, new_index))}
        rep.layers.append({"name": prefix, "kind": "decoder_layers", "units_before": cur["num_hidden_layers"],
                           "units_after": len(kept_layers), "removed_layers": removed, "ranking": depth_ranking,
                           "contiguous": contiguous, "scores": scores["scores"]})
    if channels is not None:
        prune_hidden(base, channels)
        rep.layers.append({"name": "hidden_size", "kind": "hidden", "units_before": cur["hidden_size"],
                           "units_after": int(channels.numel()), "kept_channels": channels.tolist()})
    rebuild_check(base, "prune_structured")
    rep.params_before, rep.bytes_before = params_b, bytes_b
    rep.params_after, rep.bytes_after = _params_bytes(base)
    return rep


def _select_names(names, include, exclude):
    from raydistill.compress.pruner import _patterns
    from raydistill.compress.structured import _select

    return _select(names, _patterns(include, "include"), _patterns(exclude, "exclude") or [])
