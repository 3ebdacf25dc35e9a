"""The registry of loss-term types: ``type`` (the config's ``distill.terms[i].type``) -> ``Term`` class.

A new kind of knowledge is one class registered here (``@register_term("name")``) plus its config schema
(``raydistill.config``'s term models); the ``Criterion`` and the tasks need no change."""

from __future__ import annotations

TERMS: dict[str, type] = {}


def register_term(name: str):
    """Class decorator: register a ``Term`` subclass under ``name``."""
    def deco(cls):
        if name in TERMS and TERMS[name] is not cls:
            raise ValueError(f"loss term type {name!r} is registered twice ({TERMS[name].__name__}, {cls.__name__})")
        cls.type = name
        TERMS[name] = cls
        return cls
    return deco
