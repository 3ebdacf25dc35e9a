"""Built-in teacher/student families and the registry for user models.

A model is named in the config by a built-in key (``MODELS``), by ``hf`` (a transformers causal LM, see
``raydistill.models.hf``) or by ``package.module:factory``;
the factory is called with the config's ``kwargs`` plus ``in_features`` (input length) and
``num_classes`` when it accepts them, and must return an ``nn.Module`` mapping ``(B, L)`` float inputs to
``(B, num_classes)`` logits.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

# name -> "module:factory" (imported lazily so config validation never imports torch)
MODELS: dict[str, str] = {
    "cnn1d": "raydistill.models.mnist1d:CNN1D",
    "mlp": "raydistill.models.mnist1d:MLP",
    "gru": "raydistill.models.mnist1d:GRUClassifier",
    "logistic": "raydistill.models.mnist1d:Logistic",
}


def resolve_factory(name: str):
    target = MODELS.get(name, name)
    mod, sep, attr = target.partition(":")
    if not sep:
        raise ValueError(f"unknown model {name!r}; use one of {sorted(MODELS)} or 'package.module:factory'")
    try:
        module = importlib.import_module(mod)
    except ImportError as exc:
        raise ValueError(f"model {name!r}: cannot import module {mod!r} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"model {name!r}: module {mod!r} has no attribute {attr!r}") from None


def build_model(spec: Any, *, in_features: int = 40, num_classes: int = 10, vocab_size: int | None = None):
    """Build a model from a ``ModelSpec`` (or a dict with ``model`` and ``kwargs``). ``vocab_size`` (causal
    LM: the tokenizer's vocabulary) fills an ``hf`` config without one, and a factory that accepts it;
    otherwise ``in_features`` / ``num_classes`` are passed to a factory that accepts them."""
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    name, kwargs = spec["model"], dict(spec.get("kwargs") or {})
    if name == "hf":
        from raydistill.models.hf import build_hf

        return build_hf(kwargs, vocab_size=vocab_size)
    factory = resolve_factory(name)
    try:
        params = inspect.signature(factory).parameters
        accepts_var = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, accepts_var = {}, False
    extra = (("vocab_size", vocab_size),) if vocab_size is not None else \
        (("in_features", in_features), ("num_classes", num_classes))
    for key, val in extra:
        if key not in kwargs and (accepts_var or key in params):
            kwargs[key] = val
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r}: bad kwargs {sorted(kwargs)} ({exc})") from None
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def hidden_modules(model) -> list:
    """The modules whose outputs are a classifier's hidden states, in order (loss terms on hidden states
    address them 1-based): ``model.hidden_modules()`` when the model defines it, else every ``nn.Linear``
    but the last (the output layer)."""
    import torch.nn as nn

    from raydistill.utils import unwrap_model

    base = unwrap_model(model)
    if callable(getattr(base, "hidden_modules", None)):
        return list(base.hidden_modules())
    return [m for m in base.modules() if isinstance(m, nn.Linear)][:-1]
