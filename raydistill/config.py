"""The experiment config: a pydantic schema over one YAML file, plus ``--set key.path=value`` overrides.

Every model is ``extra="forbid"``, so a misspelt key is an error that names its path. All pydantic
errors are folded into one :class:`ConfigError` whose message lists each bad key path with what is
allowed there.

Public API (used by ``raydistill distill`` and ``raydistill tune``)::

    load_config(path=None, overrides=()) -> Config    # None: the embedded mnist1d_default.yaml
    apply_overrides(data, overrides) -> dict           # "a.b.c=value", value parsed as YAML
    dump_config(cfg, path)                             # YAML that load_config accepts unchanged
    ConfigError(ValueError)
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union

import yaml
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
    model_validator,
)

from raydistill.errors import ConfigError

__all__ = [
    "AssistantConfig", "StudentConfig", "StudentInitConfig", "CompressionConfig", "QuantizeConfig", "StructuredPruneConfig", "Config", "ConfigError",
    "DataConfig", "DistillConfig", "MnistDataConfig", "TextDataConfig",
    "ModelSpec", "OptimizerConfig", "RunConfigModel", "ScalingConfigModel", "ScheduleConfig",
    "TeacherConfig", "TrainingBudget", "TransferSetConfig", "apply_overrides", "config_hash",
    "default_config_path", "dump_config", "load_config", "validate_run_name", "MAX_TEMPERATURE",
]


class _Strict(BaseModel):
    # allow_inf_nan=False: an inf / nan float (``--set distill.temperature=.inf``) is an error at load time
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        """``epochs: true`` is a mistake, not 1: pydantic's lax mode would accept a bool for an int/float."""
        if isinstance(v, bool):
            field = cls.model_fields.get(info.field_name)
            ann = field.annotation if field is not None else None
            kinds = set(getattr(ann, "__args__", ())) | {ann}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"must be a number, not the boolean {v}")
        return v


_RUN_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*$")
# kd_loss computes in float32; above this temperature its result drifts from the float64 reference
# (relative error ~ eps * T^2 / logit scale^2): raydistill.ops.MAX_TEMPERATURE, repeated here so that
# config validation never imports torch (tests/test_config.py checks they agree)
MAX_TEMPERATURE = 100.0


def validate_run_name(name, key: str = "run.name") -> str:
    """A run name is one directory name under the storage path, never a path: letters, digits, ``_``,
    ``.`` and ``-``, not starting with ``.`` or ``-`` (so no ``..``, ``/``, hidden or option-like names)."""
    if not isinstance(name, str) or not _RUN_NAME.match(name) or len(name) > 200:
        raise ConfigError(f"{key}: {name!r} is not a valid run name: use letters, digits, '_', '.' and '-' "
                          f"(not starting with '.' or '-', no '/', at most 200 characters); it names a "
                          f"directory under the storage path, it is not a path")
    return name


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ModelSpec(_Strict):
    """A network: a built-in registry name (see ``raydistill.models.MODELS``), ``package.module:factory``,
    or ``hf`` (a transformers causal LM: ``kwargs: {config: {...} | file.json}`` builds it from a config,
    ``kwargs: {pretrained: DIR}`` loads a local ``from_pretrained`` directory; never the hub)."""

    model: str = Field(description="built-in name (cnn1d, mlp, gru, logistic), 'hf', or 'package.module:factory'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        from raydistill.models import MODELS

        if v in MODELS or v == "hf" or _IMPORT_PATH.match(v):
            return v
        raise ValueError(f"unknown model {v!r}; use one of {sorted(MODELS)}, 'hf' or 'package.module:factory'")

    @model_validator(mode="after")
    def _hf(self):
        if self.model == "hf":
            from raydistill.models.hf import check_hf_kwargs

            check_hf_kwargs(self.kwargs)  # ValueError naming kwargs.config / kwargs.pretrained
        return self


# the target-shape keys of student.init (transformers config names; raydistill.compress.prune_shape.SHAPE_KEYS
# without head_dim, which pruning keeps)
INIT_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size")


class StudentInitConfig(_Strict):
    """``student.init``: where the student's weights start. ``from: random`` (default): the student's own
    config, random weights. ``from: teacher``: the trained teacher (a transformers decoder LM) pruned to the
    target shape on a calibration sample of the training blocks (Minitron: Muralidharan et al. 2024), saved
    with the run and distilled; the baseline and a student distilled from random init get the same shape.
    Target: the shape keys given here (an int: a size; a float in (0, 1]: the fraction of the teacher's
    kept; a key not given keeps the teacher's size), or ``params`` with or without ``num_hidden_layers``
    (the width axes solved for that parameter count), or, with neither, the student's own config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              populate_by_name=True, serialize_by_alias=True)

    from_: Literal["random", "teacher"] = Field("random", alias="from",
                                                description="random weights, or the teacher pruned to the target")
    num_hidden_layers: int | float | None = Field(None, description="decoder layers kept (int) or fraction")
    hidden_size: int | float | None = Field(None, description="embedding channels kept (int) or fraction")
    num_attention_heads: int | float | None = Field(None, description="query heads kept (int) or fraction")
    num_key_value_heads: int | float | None = Field(None, description="KV heads kept (int) or fraction")
    intermediate_size: int | float | None = Field(None, description="MLP units kept (int) or fraction")
    params: int | float | None = Field(None, description="parameter count (int) or fraction of the teacher's: "
                                       "the width axes (hidden size, heads, intermediate size) are solved for it "
                                       "at num_hidden_layers (the teacher's if not given)")
    depth_ranking: Literal["block_importance", "perplexity", "random"] = Field(
        "block_importance", description="which layers go: 1 - cos(in, out) of each layer, the calibration "
        "perplexity increase when it alone is skipped, or random")
    width_ranking: Literal["activation", "random"] = Field(
        "activation", description="which channels / heads / MLP units go: activation importance, or random")
    contiguous: bool = Field(False, description="remove one window of consecutive layers")
    calibration_blocks: int = Field(64, ge=1, description="training blocks (data.seq_len tokens each) the "
                                    "rankings are measured on, drawn with seed")
    seed: int = Field(0, description="picks the calibration blocks (and the random rankings)")

    @field_validator(*INIT_SHAPE_KEYS, "params")
    @classmethod
    def _size(cls, v):
        if v is None:
            return v
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError("a float is the fraction of the teacher's size kept and must be in (0, 1]")
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 (a size) or a float in (0, 1] (a fraction)")
        return v

    @model_validator(mode="after")
    def _target(self):
        given = self.shape()
        if self.from_ == "random" and (given or self.params is not None):
            keys = sorted(given) + (["params"] if self.params is not None else [])
            raise ValueError(f"{', '.join(keys)}: a target shape needs from: teacher (from: random builds the "
                             "student's own config)")
        width = sorted(set(given) - {"num_hidden_layers"})
        if self.params is not None and width:
            raise ValueError(f"params solves the width axes; give params (with num_hidden_layers or not) or "
                             f"{', '.join(width)}, not both")
        return self

    def shape(self) -> dict:
        """The target-shape keys given (size or fraction)."""
        return {k: getattr(self, k) for k in INIT_SHAPE_KEYS if getattr(self, k) is not None}


class StudentConfig(ModelSpec):
    init: StudentInitConfig = Field(default_factory=StudentInitConfig,
                                    description="random weights, or the teacher pruned to a target shape")


class OptimizerConfig(_Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")


class ScheduleConfig(_Strict):
    """Learning-rate schedule, stepped once per optimizer step."""

    name: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = Field(0.3, ge=0, lt=1, description="onecycle: fraction of steps rising to lr")
    warmup_steps: int = Field(0, ge=0, description="cosine / constant: optimizer steps of linear warmup from 0 "
                                                   "to lr (onecycle: use warmup_fraction)")

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps and self.name == "onecycle":
            raise ValueError("warmup_steps is for cosine / constant; onecycle's warmup is warmup_fraction")
        return self


# ----------------------------------------------------------------------------------------------------
# training at scale (issue 22): keys that `distill` and `teacher.training` share


class ScaleKeys(_Strict):
    """Precision, gradient accumulation, activation checkpointing, a step or token budget and step
    checkpoints of one training stage. ``distill`` and ``teacher.training`` take the same keys. With a
    budget (``max_steps`` / ``max_tokens``) ``epochs`` is derived from it and must not be set as well."""

    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the dtype the student and teacher compute in: bf16 / fp16 run the student on a "
                            "low-precision copy of float32 master weights (optimizer state float32) and the frozen "
                            "teacher in that dtype; fp16 adds a gradient scaler and needs a GPU")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches of batch_size per optimizer step")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward (transformers' gradient_checkpointing_enable)")
    max_steps: int | None = Field(None, ge=1, description="budget in optimizer steps (instead of epochs)")
    max_tokens: int | None = Field(None, ge=1, description="causal LM: budget in training tokens (rows x seq_len, "
                                                           "all workers), rounded up to whole optimizer steps")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also report and checkpoint every N optimizer steps (a resumed run continues "
                                "with the next batch); None: once per epoch")
    log_every_steps: int = Field(10, ge=1, description="a line in the stage's steps.jsonl every N optimizer steps")

    @model_validator(mode="after")
    def _one_budget(self):
        budget = "max_steps" if self.max_steps is not None else "max_tokens" if self.max_tokens is not None else None
        if self.max_steps is not None and self.max_tokens is not None:
            raise ValueError(f"max_steps ({self.max_steps}) and max_tokens ({self.max_tokens}) are both set: "
                             "give one budget")
        epochs = getattr(self, "epochs", None)
        if budget and epochs is not None and "epochs" in self.model_fields_set:
            raise ValueError(f"epochs ({epochs}) and {budget} ({getattr(self, budget)}) are both set and may "
                             f"contradict each other: give one budget (remove epochs, or set it to null)")
        if budget and epochs is not None:  # the default epochs: the budget decides
            object.__setattr__(self, "epochs", None)
        if not budget and epochs is None and hasattr(self, "epochs"):
            raise ValueError("epochs is null but no max_steps or max_tokens is set: give one budget")
        return self


# the run-only keys never change what is learned; the others left at their defaults are dropped from hashes
_SCALE_RUN_ONLY = ("gradient_checkpointing", "checkpoint_every_steps", "log_every_steps")


def without_scale_defaults(dump: dict) -> dict:
    """A section's dump (``teacher``, ``distill``, or one with a ``training`` section) without the issue-22
    keys that do not change what is learned or are at their defaults, so that hashes (the teacher cache,
    checkpoints) of configs that do not use them stay what they were."""
    out = dict(dump)
    if isinstance(out.get("training"), dict):
        out["training"] = without_scale_defaults(out["training"])
    for name, f in ScaleKeys.model_fields.items():
        if name in out and (name in _SCALE_RUN_ONLY or out[name] == f.default):
            out.pop(name)
    if isinstance(out.get("lr_schedule"), dict) and not out["lr_schedule"].get("warmup_steps"):
        out["lr_schedule"] = {k: v for k, v in out["lr_schedule"].items() if k != "warmup_steps"}
    return out


class TrainingBudget(ScaleKeys):
    """How a network is trained with plain cross-entropy (the teacher; the baseline student)."""

    epochs: int | None = Field(60, ge=1, description="None: derived from max_steps / max_tokens")
    batch_size: int = Field(128, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class TeacherConfig(ModelSpec):
    checkpoint: str | None = Field(None, description="trained weights (.safetensors or a checkpoint dir); "
                                                     "skips teacher training")
    training: TrainingBudget = Field(default_factory=TrainingBudget)
    teacher_outputs: str | None = Field(
        None, description="this teacher's top-k outputs (parquet written by `raydistill teacher-logits`): its "
                          "logit terms read them instead of running it (at most one teacher of a job)")


_TEACHER_NAME = re.compile(r"^[A-Za-z_][\w-]*$")


class TransferSetConfig(_Strict):
    """Extra unlabelled inputs the teacher labels with soft targets (Hinton et al., 2015)."""

    size: int = Field(20000, ge=0, description="number of extra unlabelled samples (0: labelled data only)")
    seed: int = Field(1234, description="generator seed; must differ from data.seed")
    hard_labels: Literal["teacher_argmax", "none"] = Field(
        "teacher_argmax",
        description="hard-label term for unlabelled rows: the teacher's argmax, or none (soft term only)")


# ----------------------------------------------------------------------------------------------------
# loss terms (raydistill.losses): what a student learns from


class _Term(_Strict):
    weight: float = Field(1.0, ge=0, description="the term's weight in the total loss (0: not computed)")


class KDLogitsTerm(_Term):
    """The teachers' softened output distributions (``ops.kd_loss``)."""

    type: Literal["kd_logits"]
    teacher: str | None = Field(None, description="the teacher (default: the first of teachers)")
    teachers: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="several teachers: name -> weight (instead of teacher)")
    combine: Literal["sum", "mean"] = Field(
        "sum", description="several teachers: the weighted sum of per-teacher terms, or the term of the "
                           "weighted mean of their distributions")
    temperature: float | None = Field(None, gt=0, le=MAX_TEMPERATURE, description="default distill.temperature")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] | None = Field(None, description="default "
                                                                                           "distill.divergence")
    beta: float | None = Field(None, gt=0, lt=1, description="default distill.beta")

    @model_validator(mode="after")
    def _one_form(self):
        if self.teacher is not None and self.teachers is not None:
            raise ValueError("give teacher (one) or teachers (several, with weights), not both")
        if self.teachers is not None and not any(w > 0 for w in self.teachers.values()):
            raise ValueError("teachers: every teacher weight is 0 (or none is given); give one a positive weight")
        return self


class CETerm(_Term):
    """Cross-entropy with the hard labels."""

    type: Literal["ce"]


def _layer_map(v: Any) -> Any:
    """``uniform``, ``last`` or ``[[student layer, teacher layer], ...]`` (1-based layer numbers)."""
    if v in ("uniform", "last"):
        return v
    ok = isinstance(v, list) and v and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                             and i >= 1 for i in p) for p in v)
    if not ok:
        raise ValueError(f"must be 'uniform', 'last' or a list of [student layer, teacher layer] pairs of layer "
                         f"numbers >= 1, e.g. [[1, 2], [2, 4]]")
    return [list(p) for p in v]


LayerMap = Annotated[Any, BeforeValidator(_layer_map)]


class HiddenTerm(_Term):
    """Hidden states of the student against a teacher's (per-row MSE or cosine)."""

    type: Literal["hidden"]
    teacher: str | None = Field(None, description="the teacher (default: the first of teachers)")
    layers: LayerMap = Field("uniform", description="uniform (min(depths) pairs, evenly spaced), last, or "
                                                    "[[student layer, teacher layer], ...] (1-based)")
    metric: Literal["mse", "cosine"] = "mse"
    projection: bool = Field(True, description="learn a linear projection where the widths differ")


class RelationTerm(_Term):
    """Similarity-preserving KD: the batch's Gram matrix of pooled hidden states, student vs teacher."""

    type: Literal["relation"]
    teacher: str | None = Field(None, description="the teacher (default: the first of teachers)")
    layers: LayerMap = Field("last", description="as for hidden; default the last layers")


TERM_MODELS = {"kd_logits": KDLogitsTerm, "ce": CETerm, "hidden": HiddenTerm, "relation": RelationTerm}


def _term_tag(v: Any) -> str | None:
    """The term union's member: its ``type``."""
    return v.get("type") if isinstance(v, dict) else getattr(v, "type", None)


AnyTerm = Annotated[Union[tuple(Annotated[m, Tag(k)] for k, m in TERM_MODELS.items())], Discriminator(_term_tag)]


class DistillConfig(ScaleKeys):
    temperature: float = Field(4.0, gt=0, le=MAX_TEMPERATURE,
                               description="softmax temperature; at most 100 (kd_loss's float32 accuracy bound)")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (teacher) term; 1-alpha on hard labels")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1, description="mixing weight of the jsd divergence")
    epochs: int | None = Field(20, ge=1, description="None: derived from max_steps / max_tokens")
    batch_size: int = Field(128, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    transfer_set: TransferSetConfig = Field(default_factory=TransferSetConfig)
    teacher_outputs: str | None = Field(
        None, description="parquet written by `raydistill teacher-logits`: distil from its top-k logits "
                          "(kd_loss_topk) instead of running the teacher online")
    topk: int = Field(10, ge=1, description="logits kept per row (per token) by `raydistill teacher-logits`")
    topk_tail: bool | None = Field(
        None, description="teacher_outputs: add the teacher's mass outside the top-k to the loss (a rest bucket); "
                          "null: when the cache has it at distill.temperature; true: required; false: never")
    fused_linear: bool = Field(True, description="causal LM: fuse lm_head and kd_loss (raydistill.ops."
                                                 "kd_loss_linear) when that op is available")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this (None: off)")
    terms: list[AnyTerm] | None = Field(
        None, description="the loss: weighted terms (kd_logits, ce, hidden, relation); None: kd_logits of the "
                          "first teacher (weight alpha) + ce (weight 1 - alpha)")

    @model_validator(mode="after")
    def _terms(self):
        if self.terms is not None:
            if not self.terms:
                raise ValueError("terms: an empty list; give at least one term (or leave terms out)")
            if not any(t.weight > 0 for t in self.terms):
                raise ValueError("terms: every term's weight is 0; give at least one a positive weight")
        return self

    @model_validator(mode="after")
    def _topk_divergence(self):
        if self.teacher_outputs and self.divergence == "reverse_kl":
            raise ValueError("divergence 'reverse_kl' cannot be used with top-k teacher_outputs "
                             "(the teacher has zero probability outside its top-k); use forward_kl or jsd")
        return self


STEP_TYPES = ("prune_structured", "prune", "quantize")
_PRUNE_KEYS = ("sparsity", "method", "scope", "n", "m", "block", "include", "exclude", "keep_output_dense",
               "begin_fraction", "end_fraction", "frequency")


class StructuredPruneConfig(_Strict):
    """``prune_structured`` step: remove whole hidden units of the (dense-distilled) student before the
    student stage distils it to recover (Minitron); the result is a smaller dense model."""

    ratio: float = Field(0.5, ge=0, lt=1, description="fraction of hidden units removed per layer (0: off)")
    ranking: Literal["weight_norm", "activation"] = Field(
        "activation", description="rank units by incoming weight norm, or by activation on a calibration batch")
    calibration_size: int = Field(1024, ge=1, description="training rows in the calibration batch (activation)")
    include: list[str] | None = Field(None, description="glob patterns of first layers of unit pairs, of "
                                      "gated MLP modules and of attention modules (default all)")
    exclude: list[str] | None = None
    head_unit: Literal["kv_group", "query"] = Field(
        "kv_group", description="attention heads: remove whole KV groups (a KV head and its query heads), or "
        "query heads only (the same number per KV group)")


class QuantizeConfig(_Strict):
    """``quantize`` step: int8/int4 weights (and int8 dynamic activations), post-training after distillation
    (``ptq``) or fake-quantized while distilling (``qat``) and converted at the end."""

    bits: Literal[4, 8, 32] = Field(8, description="weight bits (32: no quantization)")
    group_size: int | None = Field(None, ge=1, description="input columns per scale (None: one per output channel)")
    activations: Literal["int8"] | None = Field(None, description="int8 dynamic activations, or None (fp32)")
    mode: Literal["ptq", "qat"] = "qat"
    include: list[str] | None = None
    exclude: list[str] | None = None
    start: Literal["scratch", "dense_student"] = Field(
        "scratch", description="qat: the student stage distils from its initialisation ('scratch'), or "
        "fine-tunes the fp32 distilled dense student with fake quantization ('dense_student'; it runs after "
        "the dense stage)")
    epochs: int | None = Field(None, ge=1, description="qat from dense_student: fine-tuning epochs "
                               "(None: distill.epochs)")
    lr: float | None = Field(None, gt=0, description="qat from dense_student: peak learning rate of the "
                             "fine-tuning (None: distill.optimizer.lr)")

    @model_validator(mode="after")
    def _start(self):
        if self.start == "dense_student" and self.mode != "qat":
            raise ValueError("start 'dense_student' is QAT fine-tuning: it needs mode 'qat' "
                             f"(mode {self.mode!r} quantizes the distilled student after training)")
        for key in ("epochs", "lr"):
            if getattr(self, key) is not None and self.start != "dense_student":
                raise ValueError(f"{key} sets the QAT fine-tuning of start 'dense_student'; with start "
                                 f"{self.start!r} the student stage uses distill.{'epochs' if key == 'epochs' else 'optimizer.lr'}")
        return self


class CompressionConfig(_Strict):
    """The student's compression recipe: an ordered list of steps (``order``), each configured by its key.

    ``prune`` (gradual masks while distilling, then SparseLinear) is configured by the top-level keys
    (``sparsity``, ``method``, ...: today's single-key form, which means ``[prune]``), ``prune_structured``
    by ``structured`` and ``quantize`` by ``quantize``. YAML may also give the list itself::

        compression:
          - prune_structured: {ratio: 0.5}
          - prune: {sparsity: 0.8}
          - quantize: {bits: 8, mode: qat}

    which is read as the keyed form (``order`` = the list's order). Rules: ``prune_structured`` comes
    before ``prune`` (it changes the shapes the masks are for), ``quantize`` last (the others need float
    weights); each step at most once.
    """

    sparsity: float = Field(0.8, ge=0, lt=1, description="final fraction of zero weights in pruned layers")
    method: Literal["magnitude", "nm", "block"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    n: int = Field(2, ge=1)
    m: int = Field(4, ge=2)
    block: int = Field(4, ge=1)
    include: list[str] | None = Field(None, description="glob patterns of Linear layers to prune (default all)")
    exclude: list[str] | None = None
    keep_output_dense: bool = Field(
        True, description="never prune the model's last nn.Linear (the classifier head: few weights, and "
                          "pruning it costs the most accuracy per weight)")
    begin_fraction: float = Field(0.1, ge=0, le=1, description="pruning starts at this fraction of steps")
    end_fraction: float = Field(0.7, ge=0, le=1, description="final sparsity reached at this fraction")
    frequency: int = Field(10, ge=1, description="update masks every N optimizer steps")
    structured: StructuredPruneConfig | None = Field(None, description="the prune_structured step")
    quantize: QuantizeConfig | None = Field(None, description="the quantize step")
    order: list[Literal["prune_structured", "prune", "quantize"]] | None = Field(
        None, description="step order (None: prune_structured, prune, quantize for those configured)")

    @model_validator(mode="before")
    @classmethod
    def _list_form(cls, data):
        if isinstance(data, dict) and isinstance(data.get("steps"), list):
            rest = {k: v for k, v in data.items() if k != "steps"}
            return {**rest, **_steps_to_keyed(data["steps"], "compression.steps")}
        if isinstance(data, list):
            return _steps_to_keyed(data, "compression")
        return data

    @model_validator(mode="after")
    def _window(self):
        if self.end_fraction < self.begin_fraction:
            raise ValueError(f"end_fraction ({self.end_fraction}) must be >= begin_fraction ({self.begin_fraction})")
        if self.method == "nm" and self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be < m ({self.m}) for method 'nm'")
        if self.order is not None:
            check_step_order(self.order, "compression.order")
            for st, key in (("prune_structured", "structured"), ("quantize", "quantize")):
                if st in self.order and getattr(self, key) is None:
                    object.__setattr__(self, key, StructuredPruneConfig() if key == "structured" else QuantizeConfig())
        return self

    def steps(self) -> list[tuple[str, Any]]:
        """The resolved ordered steps that do something: [(type, config)], prune's config being self."""
        cfgs = {"prune": self if self.sparsity > 0 else None,
                "prune_structured": self.structured if self.structured and self.structured.ratio > 0 else None,
                "quantize": self.quantize if self.quantize and self.quantize.bits != 32 else None}
        order = self.order if self.order is not None else list(STEP_TYPES)
        out = [(t, cfgs[t]) for t in order if cfgs.get(t) is not None]
        check_step_order([t for t, _ in out], "compression.order")
        return out


def check_step_order(order: list[str], key: str = "compression") -> None:
    """Raise ValueError naming ``key`` when steps repeat or come in an order that cannot work."""
    seen: list[str] = []
    for i, t in enumerate(order):
        if t not in STEP_TYPES:
            raise ValueError(f"{key}[{i}]: unknown step {t!r}; use one of {list(STEP_TYPES)}")
        if t in seen:
            raise ValueError(f"{key}[{i}]: step {t!r} appears twice (each step at most once)")
        if "quantize" in seen:
            raise ValueError(f"{key}[{i}]: {t!r} after 'quantize' cannot work: {t} needs float weights, so "
                             "quantize must be the last step")
        if t == "prune_structured" and "prune" in seen:
            raise ValueError(f"{key}[{i}]: 'prune_structured' after 'prune' cannot work: it changes the layer "
                             "shapes the prune masks are for; put prune_structured first")
        seen.append(t)


def _steps_to_keyed(steps: list, key: str) -> dict:
    """The list form [{type: {...}}, ...] (or [{type: name, ...}]) -> the keyed CompressionConfig dict."""
    out: dict[str, Any] = {"order": []}
    for i, item in enumerate(steps):
        if isinstance(item, str):
            name, params = item, {}
        elif isinstance(item, dict) and len(item) == 1 and "type" not in item:
            name, params = next(iter(item.items()))
            params = params or {}
        elif isinstance(item, dict) and "type" in item:
            name, params = item["type"], {k: v for k, v in item.items() if k != "type"}
        else:
            raise ValueError(f"{key}[{i}]: a step is {{prune|prune_structured|quantize: {{...}}}}, got {item!r}")
        if name not in STEP_TYPES:
            raise ValueError(f"{key}[{i}]: unknown step {name!r}; use one of {list(STEP_TYPES)}")
        if not isinstance(params, dict):
            raise ValueError(f"{key}[{i}].{name}: the step's settings must be a mapping, got {params!r}")
        out["order"].append(name)
        if name == "prune":
            bad = sorted(set(params) - set(_PRUNE_KEYS))
            if bad:
                raise ValueError(f"{key}[{i}].prune: unknown keys {bad}; allowed: {list(_PRUNE_KEYS)}")
            out.update(params)
        else:
            out["structured" if name == "prune_structured" else "quantize"] = params
    if "prune" not in out["order"]:
        out["sparsity"] = 0.0
    check_step_order(out["order"], key)
    return out


class DataConfig(_Strict):
    """MNIST-1D (generated locally): the classification task."""

    name: Literal["mnist1d"] = "mnist1d"
    num_train: int = Field(4000, ge=20, description="labelled training samples (val split comes out of these)")
    num_test: int = Field(1000, ge=10)
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="held-out part of train for val_accuracy")
    seed: int = Field(42, description="MNIST-1D generator seed (42 = the paper's dataset)")
    materialize: bool = Field(True, description="workers hold their shard in memory after the first pass")

    @property
    def task(self) -> str:
        return "classification"

    def learning_dump(self) -> dict:
        """The keys that change what is learned (hashes of stages, teachers and trials)."""
        return self.model_dump(mode="json", exclude={"materialize"})


MnistDataConfig = DataConfig


class TextDataConfig(_Strict):
    """A text corpus for causal-LM distillation, read with Ray Data, tokenized and packed into blocks."""

    name: Literal["text"] = "text"
    path: str | None = Field(None, description="a .txt/.py/.md/.jsonl/.parquet file or a folder of them; None: "
                                               "the Python standard library's own .py sources (on every machine)")
    text_column: str = Field("text", description="jsonl/parquet: the column holding the documents")
    max_bytes: int | None = Field(2_000_000, ge=1000, description="read files (sorted) until this many bytes")
    skip_bad_files: bool = Field(
        False, description="a corpus file that is not UTF-8 text (binary, another encoding, NUL bytes) or a "
                           "jsonl file with a line that is not a JSON object holding text_column: false refuses "
                           "the corpus, naming the files; true leaves such files out (with a warning)")
    tokenizer: str | None = Field(None, description="a local tokenizer directory (tokenizer.json); None: train "
                                                    "a byte-level BPE on the corpus, saved with the run")
    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary when the tokenizer is trained here")
    seq_len: int = Field(128, ge=8, description="tokens per packed block")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="held-out blocks (half val, half test)")
    seed: int = Field(0, description="the seeded permutation of the packed blocks: the val / test / train split "
                                     "and the train shards' order")
    materialize: bool | None = Field(
        None, description="true: workers hold their shard of the train split in memory; false: they stream it "
                          "from the parquet shards (a shuffle buffer, any corpus size); null: true when the "
                          "train split is at most 4M tokens (read from an offline teacher's cache: when it is at "
                          "most 1 GiB decoded)")
    tokenizer_sample_bytes: int = Field(
        32 << 20, ge=1000, description="the BPE is trained on a seeded sample of about this many bytes of the "
                                       "corpus (all of it when smaller)")
    cache_path: str | None = Field(
        None, description="where the packed corpus and the trained tokenizer are written: a local path or a "
                          "pyarrow filesystem URI (s3://, gs://, hdfs://, file://), which then holds datasets/ and "
                          "tokenizers/; null: the run's storage path")
    samples: int = Field(3, ge=0, description="greedy samples in the report")

    @field_validator("path")
    @classmethod
    def _exists(cls, v):
        if v is None:
            return v
        from raydistill.data.text import corpus_files

        try:
            corpus_files(v)
        except ValueError as exc:  # missing or empty; pydantic prefixes the key
            raise ValueError(str(exc).removeprefix("data.path: ")) from None
        return v

    @field_validator("tokenizer")
    @classmethod
    def _tok(cls, v):
        if v is not None and not (Path(v).expanduser() / "tokenizer.json").is_file():
            raise ValueError(f"{v} has no tokenizer.json (a tokenizers / transformers tokenizer directory)")
        if v is not None:
            from raydistill.data.text import load_tokenizer

            try:
                load_tokenizer(v)
            except ValueError as exc:  # pydantic prefixes the key
                raise ValueError(str(exc).removeprefix("data.tokenizer: ")) from None
        return v

    @property
    def task(self) -> str:
        return "causal_lm"

    def learning_dump(self) -> dict:
        """The keys that change what is learned (hashes of stages, teachers and trials): not where the corpus
        is written or whether workers stream it, and ``tokenizer_sample_bytes`` only when it is not the
        default (hashes of configs that leave it stay what they were)."""
        out = self.model_dump(mode="json", exclude={"materialize", "cache_path"})
        if out["tokenizer_sample_bytes"] == type(self).model_fields["tokenizer_sample_bytes"].default:
            out.pop("tokenizer_sample_bytes")
        return out


def _data_tag(v: Any) -> str:
    """The ``data`` union's member: ``data.name`` (default ``mnist1d``)."""
    name = v.get("name", "mnist1d") if isinstance(v, dict) else getattr(v, "name", "mnist1d")
    return str(name)


AnyData = Annotated[Union[Annotated[DataConfig, Tag("mnist1d")], Annotated[TextDataConfig, Tag("text")]],
                    Discriminator(_data_tag)]


class ScalingConfigModel(_Strict):
    num_workers: int = Field(1, ge=1)
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: replicated model (prepare_model); fsdp: FSDP2 fully_shard (parameters, gradients "
                           "and optimizer state sharded over the workers; each transformer layer its own unit)")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = Field(None, description='e.g. {"CPU": 1}')


class RunConfigModel(_Strict):
    storage_path: str | None = Field(None, description="default ./runs")
    name: str = Field("mnist1d_default", description="run directory under storage_path (a name, not a path)")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept per Ray Train run")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts allowed (-1: unlimited)")
    seed: int = 0
    concurrent_stages: bool = Field(True, description="run baseline / dense / sparse students at once")
    debug_crash_at_epoch: int | None = Field(
        None, ge=1, description="testing: a worker exits mid-way through this epoch (first attempt only)")
    # issue 22: experiment tracking, and a crash after an optimizer step (tests of the mid-epoch resume)
    tracking: Literal["none", "mlflow", "tensorboard"] = Field(
        "none", description="log config, per-step / per-epoch metrics, the report and the exported student to "
                            "MLflow or TensorBoard")
    tracking_uri: str | None = Field(
        None, description="mlflow: a tracking URI (default sqlite:///<storage>/mlflow.db); tensorboard: a log "
                          "directory (default <storage>/<name>/tensorboard)")
    debug_crash_at_step: int | None = Field(
        None, ge=1, description="testing: a worker exits right after this optimizer step (first attempt only)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return validate_run_name(v, "name")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("name: ")) from None


class AssistantConfig(ModelSpec):
    epochs: int | None = Field(None, ge=1, description="default distill.epochs")


class Config(_Strict):
    teacher: TeacherConfig = Field(default_factory=lambda: TeacherConfig(model="cnn1d"))
    teachers: dict[str, TeacherConfig] | None = Field(
        None, description="several teachers: name -> teacher (the first is `teacher`, and the teacher of terms "
                          "that name none); leave out for the one-teacher form `teacher`")
    student: StudentConfig = Field(default_factory=lambda: StudentConfig(model="mlp"))
    assistants: list[AssistantConfig] = Field(default_factory=list, description="teacher -> a1 -> ... -> student")
    data: AnyData = Field(default_factory=DataConfig, description="mnist1d (classification) or text "
                                                                 "(causal LM): the task follows")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    scaling: ScalingConfigModel = Field(default_factory=ScalingConfigModel)
    run: RunConfigModel = Field(default_factory=RunConfigModel)
    search: dict[str, Any] | None = Field(None, description="raw; validated by raydistill.tune")

    @model_validator(mode="after")
    def _teachers(self):
        if self.teachers is None:
            return self
        if not self.teachers:
            raise ValueError("teachers: an empty mapping; name at least one teacher (or use teacher)")
        for n in self.teachers:
            if not _TEACHER_NAME.match(n):
                raise ValueError(f"teachers: {n!r} is not a valid teacher name (letters, digits, '_', '-')")
        first = next(iter(self.teachers.values()))
        if "teacher" in self.model_fields_set and self.teacher != first:
            raise ValueError("teacher: give teacher (one teacher) or teachers (several), not both")
        object.__setattr__(self, "teacher", first)  # the one-teacher form reads the first teacher
        return self

    def teacher_map(self) -> dict[str, TeacherConfig]:
        """Every teacher by name (the one-teacher form: ``{"main": teacher}``), the first first."""
        return dict(self.teachers) if self.teachers is not None else {"main": self.teacher}

    def teacher_key(self, name: str) -> str:
        """The config key of a teacher (``teacher`` or ``teachers.NAME``), for messages."""
        return "teacher" if self.teachers is None else f"teachers.{name}"

    def offline_teacher(self) -> str | None:
        """The teacher whose logit terms read cached top-k outputs (``teacher_outputs``), if any."""
        first = next(iter(self.teacher_map()))
        if self.distill.teacher_outputs:
            return first
        return next((n for n, t in self.teacher_map().items() if t.teacher_outputs), None)

    def teacher_outputs_path(self) -> str | None:
        name = self.offline_teacher()
        return None if name is None else (self.distill.teacher_outputs or self.teacher_map()[name].teacher_outputs)

    def teacher_outputs_key(self) -> str:
        """The config key that names the offline teacher's cache (for messages)."""
        if self.distill.teacher_outputs:
            return "distill.teacher_outputs"
        return f"{self.teacher_key(self.offline_teacher() or next(iter(self.teacher_map())))}.teacher_outputs"

    def loss_terms(self) -> list[dict]:
        """The student's loss as resolved term specs (``raydistill.losses``): ``distill.terms`` with their
        defaults filled in (teacher: the first; temperature / divergence / beta: ``distill``'s), or for the
        one-teacher form ``kd_logits`` (weight alpha) + ``ce`` (weight 1 - alpha)."""
        d = self.distill
        first = next(iter(self.teacher_map()))
        if d.terms is None:
            return [{"type": "kd_logits", "weight": d.alpha, "teachers": {first: 1.0}, "combine": "sum",
                     "temperature": d.temperature, "divergence": d.divergence, "beta": d.beta,
                     "key": "distill.alpha"},
                    {"type": "ce", "weight": 1.0 - d.alpha, "key": "distill.alpha"}]
        out = []
        for i, t in enumerate(d.terms):
            spec = t.model_dump(mode="json")
            spec["key"] = f"distill.terms.{i}"
            if t.type == "kd_logits":
                spec["teachers"] = dict(t.teachers) if t.teachers is not None else {t.teacher or first: 1.0}
                spec.pop("teacher")
                for k in ("temperature", "divergence", "beta"):
                    if spec[k] is None:
                        spec[k] = getattr(d, k)
            elif "teacher" in spec:
                spec["teacher"] = t.teacher or first
            out.append(spec)
        return out

    def _check_terms(self) -> None:
        """Terms name known teachers; an offline teacher serves logit terms only (and no reverse_kl)."""
        names = self.teacher_map()
        offline = self.offline_teacher()
        if self.distill.teacher_outputs and next(iter(names.values())).teacher_outputs:
            raise ValueError(f"distill.teacher_outputs: {self.teacher_key(next(iter(names)))}.teacher_outputs is "
                             "set too; give the first teacher's outputs once")
        cached = [n for n, t in names.items() if t.teacher_outputs]
        if len(cached) > 1:
            raise ValueError(f"{self.teacher_key(cached[1])}.teacher_outputs: only one teacher of a job can read "
                             f"cached outputs ({self.teacher_key(cached[0])} does already)")
        for spec in self.loss_terms():
            key = spec["key"]
            used = list(spec.get("teachers") or {}) or ([spec["teacher"]] if "teacher" in spec else [])
            for n in used:
                if n not in names:
                    where = f"{key}.teachers.{n}" if "teachers" in spec else f"{key}.teacher"
                    raise ValueError(f"{where}: unknown teacher {n!r}; the teachers are {', '.join(names)}")
                if n == offline and spec["type"] != "kd_logits":
                    raise ValueError(f"{key}.teacher: teacher {n!r} is read from its cached top-k outputs, which "
                                     f"hold logits only; a {spec['type']} term needs a teacher that runs")
            if spec["type"] == "kd_logits" and offline in used:
                if spec["divergence"] == "reverse_kl":
                    raise ValueError(f"{key}.divergence: 'reverse_kl' cannot be used with teacher {offline!r}'s "
                                     "top-k outputs (the teacher has zero probability outside its top-k); use "
                                     "forward_kl or jsd")
                if spec["combine"] == "mean" and len(used) > 1:
                    raise ValueError(f"{key}.combine: 'mean' of distributions needs every teacher's full logits; "
                                     f"teacher {offline!r} has top-k outputs only (use combine: sum)")

    @model_validator(mode="after")
    def _scale(self):
        """Training at scale (issue 22): rules between sections."""
        sections = [("distill", self.distill)] + [(f"{self.teacher_key(n)}.training", t.training)
                                                  for n, t in self.teacher_map().items()]
        for key, sec in sections:
            if sec.precision == "fp16" and not self.scaling.use_gpu:
                raise ValueError(f"{key}.precision: fp16 needs a GPU (scaling.use_gpu: true); on CPUs torch's "
                                 f"fp16 matmuls are slower than fp32 and need a loss scaler: use bf16 or fp32")
            if sec.max_tokens is not None and self.data.task != "causal_lm":
                raise ValueError(f"{key}.max_tokens: a token budget is for causal LM data (data.name: text); "
                                 f"use max_steps")
        return self

    @model_validator(mode="after")
    def _cross(self):
        self._check_terms()
        if self.student.init.from_ == "teacher":
            _check_init_from_teacher(self)
        if self.scaling.strategy == "fsdp" and self.compression.sparsity > 0:
            raise ValueError("scaling.strategy: fsdp shards the weights that gradual pruning scores; use "
                             "strategy ddp with compression.sparsity > 0 (or set compression.sparsity: 0)")
        if self.data.name == "text":
            from raydistill.models.hf import check_lm_models

            check_lm_models(self)  # seq_len vs max positions, tokenizer vs vocab (ValueError naming the key)
            return self
        if self.distill.topk > 10:
            raise ValueError(f"distill.topk ({self.distill.topk}) must be <= 10 (MNIST-1D has 10 classes)")
        if self.distill.transfer_set.size and self.distill.transfer_set.seed == self.data.seed:
            raise ValueError("distill.transfer_set.seed must differ from data.seed (else the transfer set "
                             "repeats the labelled data)")
        return self


def _check_init_from_teacher(cfg: "Config") -> None:
    """``student.init.from: teacher`` against the rest of the config (the shapes are checked against the
    teacher's config before Ray starts: raydistill.distill.student_init.check_student_init)."""
    if cfg.teacher.model != "hf":  # the first teacher (of teachers) is the one pruned
        key = cfg.teacher_key(next(iter(cfg.teacher_map())))
        raise ValueError(f"student.init.from: teacher prunes a transformers decoder LM; {key}.model is "
                         f"{cfg.teacher.model!r}, not 'hf'")
    steps = dict(cfg.compression.steps())
    if "prune_structured" in steps:
        raise ValueError("student.init.from: teacher already prunes the teacher to the student's shape; remove "
                         "compression.structured (prune_structured shrinks the dense distilled student, which "
                         "starts from random weights)")
    q = steps.get("quantize")
    if q is not None and q.mode == "qat" and q.start == "dense_student":
        raise ValueError("student.init.from: teacher: compression.quantize.start 'dense_student' would fine-tune "
                         "the student distilled from random init, not the pruned teacher; use start 'scratch'")


# ----------------------------------------------------------------------------------------------------
# loading, overrides, dumping


def shipped_config_path(name: str) -> Path:
    """A config shipped with raydistill: ``tune_configs/<name>`` inside the package (wheel install) or at
    the repository root (checkout / editable install)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "tune_configs" / name, here.parent / "tune_configs" / name):
        if cand.is_file():
            return cand
    raise ConfigError(f"the shipped config tune_configs/{name} was not found in the package ({here}) or next "
                      f"to it ({here.parent}); pass a config path")


def default_config_path() -> Path:
    """The embedded default of ``raydistill distill``: tune_configs/mnist1d_default.yaml."""
    return shipped_config_path("mnist1d_default.yaml")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        raw_loc, e["loc"] = e["loc"], _drop_tags(e["loc"])
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = _model_at(raw_loc[:-1])
            allowed = sorted(f.alias or n for n, f in parent.model_fields.items()) if parent else []
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}" if allowed else "unknown key"
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # data.name, distill.terms[i].type
            field = "name" if loc.startswith("data") else "type"
            tags = e["ctx"].get("expected_tags") or ", ".join(repr(t) for t in TERM_MODELS)
            got = f" (got {e['ctx']['tag']!r})" if "tag" in e["ctx"] else " (missing)"
            lines.append(f"  {loc}.{field}: must be one of {tags}{got}")
            continue
        elif e["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be one of")
        elif e["type"] == "value_error":  # a model's own check that names one of its keys: "terms: ..."
            loc, msg = _key_in_message(raw_loc, loc, msg)
        inp = e.get("input")
        got = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(inp, dict) else f" (got {inp!r})"
        lines.append(f"  {loc or '<root>'}: {msg}{got}")
    return "\n".join(lines)


_TAGS = {"data": {"mnist1d": DataConfig, "text": TextDataConfig}}


def _key_in_message(raw_loc: tuple, loc: str, msg: str) -> tuple[str, str]:
    """``(distill, "terms: every ...")`` -> ``(distill.terms, "every ...")`` when the message starts with a key
    of the model at ``loc`` (at the root: with a whole key path, ``distill.terms.0.teacher: ...``)."""
    m = re.match(r"^([A-Za-z_][\w.]*): ", msg)
    model = _model_at([p for p in raw_loc if not str(p).startswith("function-after")])
    if m is None or model is None or m.group(1).split(".")[0] not in model.model_fields:
        return loc, msg
    return (f"{loc}.{m.group(1)}" if loc else m.group(1)), msg[m.end():]


def _is_term_tag(loc: tuple, i: int) -> bool:
    """``loc[i]`` is the tag of a ``distill.terms`` member (``distill.terms.0.hidden.layers``)."""
    return i >= 2 and loc[i] in TERM_MODELS and isinstance(loc[i - 1], int) and loc[i - 2] == "terms"


def _drop_tags(loc) -> tuple:
    """``data.text.path`` -> ``data.path``, ``distill.terms.0.hidden.layers`` -> ``distill.terms.0.layers``:
    a union's tag is not a key the user wrote."""
    loc = tuple(loc)
    if len(loc) > 1 and loc[0] in _TAGS and loc[1] in _TAGS[loc[0]]:
        loc = (loc[0],) + loc[2:]
    return tuple(p for i, p in enumerate(loc) if not _is_term_tag(loc, i))


def _model_at(loc) -> type[BaseModel] | None:
    loc = tuple(loc)
    if len(loc) > 1 and loc[0] in _TAGS and loc[1] in _TAGS[loc[0]]:  # a tagged union's member
        return _TAGS[loc[0]][loc[1]] if len(loc) == 2 else None
    model: Any = Config
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue
        if _is_term_tag(loc, i):
            model = TERM_MODELS[part]
            continue
        if model is DistillConfig and part == "terms":  # a union of term models: the tag says which
            continue
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return None
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
            for sub in getattr(cand, "__args__", ()):  # list[AssistantConfig]
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    model = sub
                    break
        else:
            return None
    return model if isinstance(model, type) else None


def _parse_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({exc.__class__.__name__})") from None


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of ``data`` with each ``key.path=value`` applied (value parsed as YAML)."""
    out = copy.deepcopy(dict(data or {}))
    for item in overrides or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"bad override {item!r}: expected key.path=value, e.g. distill.temperature=2")
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"bad override {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = _parse_value(raw, key)
    return out


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def resolve_config_path(path: str | Path | None) -> Path:
    """``path`` as given, or, when no such file exists and it is a bare name, the shipped config of that
    name (``lm_default`` -> tune_configs/lm_default.yaml); None: the embedded default. The result may
    not exist (the caller reports it)."""
    p = Path(path) if path is not None else default_config_path()
    if not p.is_file() and path is not None and re.fullmatch(r"[\w.-]+", str(path)):
        name = str(path) if str(path).endswith((".yaml", ".yml")) else f"{path}.yaml"
        try:  # a shipped config by name: `raydistill distill lm_default`, `raydistill tune lm_search`
            p = shipped_config_path(name)
        except ConfigError:
            pass
    return p


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load and validate a YAML config (None: the embedded default), applying ``--set`` overrides."""
    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (a path, or the name of a shipped config in tune_configs/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"config file {p} is empty; give at least one key (e.g. `student: {{model: mlp}}`), "
                          f"or omit the config argument to run the default job")
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {p}: the top level must be a mapping, got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, overrides), str(p))


def dump_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as YAML that :func:`load_config` accepts unchanged."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return p


def config_hash(obj: Any, n: int = 12) -> str:
    """Stable short hash of a (pydantic or plain) config fragment."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
