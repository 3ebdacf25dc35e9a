"""transformers causal LMs as raydistill models (``model: hf``), built locally, never from the hub.

``kwargs`` holds exactly one of:

* ``config``: a transformers config as a dict (with ``model_type``, e.g. ``llama`` or ``gpt2``) or the
  path of a JSON file holding one; the model is built with random weights (``from_config``);
* ``pretrained``: a local directory that ``AutoModelForCausalLM.from_pretrained`` loads (``config.json``
  plus weights), e.g. an exported raydistill student.

``vocab_size`` may be left out of a config: it is then the tokenizer's vocabulary. A model's vocabulary
may exceed the tokenizer's by padding only (fewer than ``VOCAB_PADDING`` extra ids, e.g. 32000 -> 32064).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VOCAB_PADDING = 128
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


def check_hf_kwargs(kwargs: dict) -> None:
    keys = set(kwargs)
    if keys - {"config", "pretrained"}:
        raise ValueError(f"kwargs: unknown key(s) {sorted(keys - {'config', 'pretrained'})} for model 'hf'; "
                         "give kwargs.config (a transformers config dict or JSON file) or kwargs.pretrained "
                         "(a local from_pretrained directory)")
    if len(keys) != 1:
        raise ValueError("kwargs: model 'hf' needs exactly one of kwargs.config (a transformers config dict or "
                         "JSON file) or kwargs.pretrained (a local from_pretrained directory)")
    hf_config_dict(kwargs)


def hf_config_dict(kwargs: dict) -> dict[str, Any]:
    """The model's transformers config as a plain dict (read without importing transformers)."""
    if "pretrained" in kwargs:
        d = Path(str(kwargs["pretrained"])).expanduser()
        if not d.is_dir():
            raise ValueError(f"kwargs.pretrained: {d} is not a directory (a local from_pretrained directory; "
                             "the hub is never used)")
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"kwargs.pretrained: {d} has no config.json (not a transformers model directory)")
        return _no_custom_code(_read_json(cfg_file, "kwargs.pretrained"), "kwargs.pretrained", cfg_file)
    conf = kwargs["config"]
    if isinstance(conf, str):
        conf = _read_json(Path(conf).expanduser(), "kwargs.config")
    if not isinstance(conf, dict):
        raise ValueError(f"kwargs.config must be a mapping or a JSON file path, got {type(conf).__name__}")
    if "model_type" not in conf:
        raise ValueError("kwargs.config needs model_type (e.g. llama, gpt2)")
    return _no_custom_code(dict(conf), "kwargs.config", "the config")


def _no_custom_code(conf: dict, key: str, where) -> dict:
    """A config that names its own model code (``auto_map``: transformers would import ``.py`` files shipped
    with the model, i.e. run them) is refused: raydistill builds only the model classes transformers ships.
    Every load also passes ``trust_remote_code=False``, so such code never runs either way."""
    if "auto_map" in conf:
        d = Path(where).parent if isinstance(where, Path) else None
        py = sorted(p.name for p in d.glob("*.py")) if d is not None and d.is_dir() else []
        shipped = f" and the directory ships {', '.join(py[:5])}{', ...' if len(py) > 5 else ''}" if py else ""
        am = conf["auto_map"]
        names = sorted(map(str, am)) if isinstance(am, dict) else am
        raise ValueError(f"{key}: {where} has auto_map (custom model code: {names!r}){shipped}; "
                         "raydistill never runs code from a model directory (trust_remote_code=False): use a model "
                         "type that transformers ships (its model_type, without auto_map)")
    return conf


def _read_json(path: Path, key: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{key}: {path} does not exist")
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{key}: {path} is not a JSON file ({exc})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{key}: {path} must hold a JSON object")
    return out


def max_positions(conf: dict) -> int | None:
    for k in _POSITION_KEYS:
        if isinstance(conf.get(k), int):
            return int(conf[k])
    return None


def check_vocab(key: str, model_vocab: int | None, tokenizer_vocab: int) -> None:
    """A model's vocabulary must hold the tokenizer's and exceed it by padding only."""
    if model_vocab is None:
        return
    if model_vocab < tokenizer_vocab:
        raise ValueError(f"{key}: vocab_size {model_vocab} is smaller than the tokenizer's vocabulary "
                         f"({tokenizer_vocab}): the tokenizer does not fit this model")
    if model_vocab - tokenizer_vocab >= VOCAB_PADDING:
        raise ValueError(f"{key}: vocab_size {model_vocab} exceeds the tokenizer's vocabulary ({tokenizer_vocab}) "
                         f"by {model_vocab - tokenizer_vocab}, more than padding (< {VOCAB_PADDING}): a different "
                         "tokenizer? Teacher and student must share one tokenizer")


def check_lm_models(cfg) -> None:
    """Cross-checks of a causal-LM config before anything runs: ``data.seq_len`` within every hf model's
    maximum positions; the tokenizer's vocabulary fitting every model (up to padding): every teacher shares
    the student's tokenizer, else the error names the teacher's key."""
    from raydistill.data.text import tokenizer_vocab_size

    data = cfg.data
    n_tok = tokenizer_vocab_size(data.tokenizer) if data.tokenizer else None
    specs = [(cfg.teacher_key(n), t) for n, t in cfg.teacher_map().items()] + [("student", cfg.student)] + \
        [(f"assistants.{i}", a) for i, a in enumerate(cfg.assistants)]
    for key, spec in specs:
        if spec.model != "hf":
            continue
        conf = hf_config_dict(spec.kwargs)
        where = f"{key}.kwargs.{'pretrained' if 'pretrained' in spec.kwargs else 'config'}"
        mp = max_positions(conf)
        if mp is not None and data.seq_len > mp:
            raise ValueError(f"data.seq_len ({data.seq_len}) exceeds {where} max positions ({mp})")
        if n_tok is not None:
            check_vocab(where, conf.get("vocab_size"), n_tok)
        elif conf.get("vocab_size") is not None and int(conf["vocab_size"]) < data.vocab_size:
            raise ValueError(f"{where}: vocab_size {conf['vocab_size']} is smaller than data.vocab_size "
                             f"({data.vocab_size}), the vocabulary of the tokenizer trained on the corpus")
        tok_dir = Path(str(spec.kwargs.get("pretrained", ""))).expanduser()
        if "pretrained" in spec.kwargs and (tok_dir / "tokenizer.json").is_file():
            if data.tokenizer is None or (Path(data.tokenizer).expanduser() / "tokenizer.json").read_bytes() != \
                    (tok_dir / "tokenizer.json").read_bytes():
                raise ValueError(f"data.tokenizer: {where} ({tok_dir}) comes with its own tokenizer; set "
                                 f"data.tokenizer: {tok_dir} (teacher and student must share one tokenizer)")


def build_hf(kwargs: dict, vocab_size: int | None = None):
    """The model: ``from_pretrained`` of a local directory, or ``from_config`` (random init)."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if "pretrained" in kwargs:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars in a job's output, once per model built
        d = str(Path(str(kwargs["pretrained"])).expanduser())
        hf_config_dict(kwargs)
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True, trust_remote_code=False)
    else:
        conf = hf_config_dict(kwargs)
        if conf.get("vocab_size") is None and vocab_size is not None:
            conf["vocab_size"] = int(vocab_size)
        conf.setdefault("use_cache", False)
        model_type = conf.pop("model_type")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **conf), trust_remote_code=False)
    model.config.use_cache = False
    return model
