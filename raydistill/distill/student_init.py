"""``student.init: {from: teacher}``: the student made by pruning the trained teacher, then distilled (the
Minitron recipe: Muralidharan et al. 2024, arXiv 2407.14679), on the driver.

    check_student_init(cfg)                 before Ray: the target against the teacher's config (ConfigError)
    shape_model(cfg)                        before Ray: the student it makes, as a model spec (random weights)
    init_target(cfg, teacher_config)        the pruning target: student.init's shape / params, else the
                                            student's own config
    calibration(cfg, storage)               the seeded sample of packed training blocks it is ranked on
                                            (calibration_from_blocks(cfg, blocks): the draw itself)
    prune_teacher(cfg, teacher, calibration, out_dir, pad_id=)   teacher model -> the saved pruned student
    student_from_teacher(cfg, teacher, calibration, out_dir)     the pipeline's step (cfg for the student
                                                                 stages + the PrunedStudent)

The pruned student is written with ``save_pretrained`` to ``<run>/pruned_student`` (config.json,
model.safetensors, pruning.json). The student stage builds ``{model: hf, kwargs: {pretrained: DIR}}`` (the
pruned weights); the baseline and the student distilled from random init build ``{model: hf, kwargs:
{config: DIR/config.json}}``: the same shape, random weights, so the three students compare like for like.

The calibration blocks are the packed training blocks (tokenized and packed through Ray Data by
:mod:`raydistill.data.text`), ``calibration_blocks`` of them drawn with ``seed``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from raydistill.config import INIT_SHAPE_KEYS, Config, ConfigError

PRUNED_DIR = "pruned_student"
REPORT_FILE = "pruning.json"


@dataclass
class PrunedStudent:
    """The teacher pruned to the student's shape and saved (``path``: a ``from_pretrained`` directory)."""

    path: str
    model: dict                          # the student stage's model: the pruned weights
    shape_model: dict                    # the same shape with random weights (baseline, dense_student)
    report: dict = field(default_factory=dict)


def from_teacher(cfg: Config) -> bool:
    return cfg.student.init.from_ == "teacher"


def teacher_config(cfg: Config) -> dict:
    """The teacher's transformers config (dict), read without building the model. A config without
    ``vocab_size`` gets the tokenizer's (``data.tokenizer``), or the vocabulary the tokenizer trained on the
    corpus is asked for (``data.vocab_size``; the trained one may come out a little smaller): the embedding's
    size counts in ``student.init.params``."""
    from raydistill.models.hf import hf_config_dict

    conf = hf_config_dict(dict(cfg.teacher.kwargs))
    if conf.get("vocab_size") is None:
        tok = getattr(cfg.data, "tokenizer", None)
        if tok:
            from raydistill.data.text import tokenizer_vocab_size

            conf["vocab_size"] = tokenizer_vocab_size(tok)
        elif getattr(cfg.data, "vocab_size", None):
            conf["vocab_size"] = int(cfg.data.vocab_size)
    return conf


def init_target(cfg: Config, teacher_conf) -> tuple[dict, str, list[str]]:
    """(target, the key errors name, notes): ``student.init``'s shape keys or ``params`` when given, else the
    student's own transformers config (:func:`raydistill.compress.student_target`: the student's attention
    width in heads of the teacher's size). ValueError naming the key otherwise."""
    from raydistill.compress.prune_shape import shape_for_params, student_target

    init = cfg.student.init
    if init.params is not None:
        return shape_for_params(teacher_conf, init.params, init.num_hidden_layers, key="student.init"), \
            "student.init", []
    if init.shape():
        return init.shape(), "student.init", []
    if cfg.student.model != "hf":
        raise ValueError(f"student.init: give a target shape ({', '.join(INIT_SHAPE_KEYS)}) or params; the "
                         f"student's model {cfg.student.model!r} has no transformers config to take the shape from")
    from raydistill.models.hf import hf_config_dict

    key = "student.kwargs." + ("pretrained" if "pretrained" in cfg.student.kwargs else "config")
    try:
        target, notes = student_target(teacher_conf, hf_config_dict(dict(cfg.student.kwargs)))
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return target, key, notes


def check_student_init(cfg: Config) -> dict | None:
    """Before Ray starts: the teacher is a transformers decoder LM whose layout pruning knows, and the target
    is a shape the teacher can be pruned to (no axis larger than the teacher's, heads dividing the hidden
    size, KV heads dividing the heads, the config class accepting it). Returns the absolute shape (None
    without ``from: teacher``); ConfigError naming the key otherwise."""
    if not from_teacher(cfg):
        return None
    from raydistill.compress.prune_shape import check_prune_target
    from raydistill.compress.structured_lm import DEPTH_MODEL_TYPES

    try:
        conf = teacher_config(cfg)
    except ValueError as exc:  # the first teacher's (of teachers) is the one pruned
        raise ConfigError(f"{cfg.teacher_key(next(iter(cfg.teacher_map())))}.{exc}") from None
    if conf.get("model_type") not in DEPTH_MODEL_TYPES or conf.get("is_encoder_decoder"):
        raise ConfigError(f"student.init.from: teacher needs a transformers decoder-only LM whose layer layout "
                          f"pruning knows (model_type {', '.join(DEPTH_MODEL_TYPES)}); the teacher has model_type "
                          f"{conf.get('model_type')!r}")
    try:
        target, key, _ = init_target(cfg, conf)
        return check_prune_target(conf, target, key=key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def shape_model(cfg: Config) -> dict | None:
    """Before Ray starts: the model spec of the student that ``from: teacher`` will make (the teacher's
    config at the target shape, random weights; :func:`check_student_init` first), for the config checks
    that build the student (loss-term layers and widths). None without ``from: teacher``."""
    shape = check_student_init(cfg)
    if shape is None:
        return None
    from raydistill.compress.prune_shape import pruned_config

    return {"model": "hf", "kwargs": {"config": pruned_config(teacher_config(cfg), shape)}}


def calibration(cfg: Config, storage: Path):
    """``student.init.calibration_blocks`` packed training blocks drawn with ``student.init.seed`` (an int64
    ``(blocks, seq_len)`` tensor), or None without ``from: teacher``. ConfigError naming the key when the
    corpus has fewer training blocks."""
    if not from_teacher(cfg):
        return None
    from raydistill.tasks import get_task

    return calibration_from_blocks(cfg, get_task(cfg.data.task).calibration_inputs(cfg, storage))


def calibration_from_blocks(cfg: Config, blocks):
    """``student.init.calibration_blocks`` of ``blocks`` (``(N, seq_len)`` token ids) drawn with
    ``student.init.seed``; ConfigError naming the key when ``N`` is smaller."""
    from raydistill.compress.structured_lm import calibration_sample

    init = cfg.student.init
    try:
        return calibration_sample(blocks, init.calibration_blocks, seed=init.seed, key="student.init.calibration_blocks")
    except ValueError as exc:
        raise ConfigError(f"{exc} (the corpus's packed training blocks of data.seq_len tokens)") from None


def prune_teacher(cfg: Config, teacher, calibration, out_dir, *, pad_id: int | None = None) -> PrunedStudent:
    """Prune ``teacher`` (a transformers decoder LM, left unchanged) to the config's target on ``calibration``
    (token ids ``(blocks, seq_len)``), ``save_pretrained`` the result to ``out_dir`` (replaced atomically) with
    ``pruning.json`` (the :class:`raydistill.compress.ShapeReport`, calibration perplexities before and
    after, seconds). No Ray."""
    from raydistill.compress.prune_shape import make_student_from_teacher
    from raydistill.compress.structured_lm import lm_nll, perplexity
    from raydistill.utils import write_json_atomic

    init = cfg.student.init
    target, key, notes = init_target(cfg, teacher.config)
    t0 = time.time()
    student, rep = make_student_from_teacher(teacher, target, calibration, depth_ranking=init.depth_ranking,
                                             width_ranking=init.width_ranking, contiguous=init.contiguous,
                                             pad_id=pad_id, seed=init.seed)
    rep.notes = notes + rep.notes
    seconds = time.time() - t0
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_pretrained(student, tmp)
    report = {**rep.to_dict(), "target": target, "target_key": key, "calibration_blocks": int(calibration.shape[0]),
              "calibration_seq_len": int(calibration.shape[1]), "seed": init.seed, "prune_seconds": seconds,
              "calibration_perplexity_teacher": perplexity(lm_nll(teacher, calibration, pad_id=pad_id, batch_size=16)),
              "calibration_perplexity_pruned": perplexity(lm_nll(student, calibration, pad_id=pad_id, batch_size=16))}
    report = json.loads(json.dumps(report))  # as pruning.json holds it (layer indices as strings)
    write_json_atomic(tmp / REPORT_FILE, report)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return PrunedStudent(path=str(out), model={"model": "hf", "kwargs": {"pretrained": str(out)}},
                         shape_model={"model": "hf", "kwargs": {"config": str(out / "config.json")}}, report=report)


def _save_pretrained(model, path: Path) -> None:
    """``save_pretrained`` (safetensors) without transformers' progress bar in the job's output."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(path), safe_serialization=True)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_teacher(teacher, vocab_size: int):
    """The trained teacher of a ``TeacherArtifact`` as a module in eval mode."""
    from raydistill.distill.checkpointing import load_weights
    from raydistill.models import build_model

    net = build_model(teacher.model, vocab_size=vocab_size)
    load_weights(net, teacher.path)
    return net.eval()


def student_from_teacher(cfg: Config, teacher, calibration, out_dir, *, info: dict) -> tuple[Config, PrunedStudent | None]:
    """The pipeline's step: with ``from: teacher``, the trained ``teacher`` (``TeacherArtifact``) pruned on
    ``calibration`` into ``out_dir``; returns the config of the student stages (its student: the pruned
    shape with random weights, for the baseline and the student distilled from random init) and the
    :class:`PrunedStudent`, whose ``model`` the student stage builds. Without it: ``(cfg, None)``."""
    if not from_teacher(cfg):
        return cfg, None
    net = load_teacher(teacher, int(info["vocab_size"]))
    pruned = prune_teacher(cfg, net, calibration, out_dir, pad_id=info.get("pad_id"))
    return with_student(cfg, pruned.shape_model), pruned


def with_student(cfg: Config, model: dict) -> Config:
    """``cfg`` whose student is ``model`` (``{model, kwargs}``), its ``init`` kept."""
    student = cfg.student.model_copy(update={"model": model["model"], "kwargs": dict(model["kwargs"])})
    return cfg.model_copy(update={"student": student})
