"""The ``search`` section of a raydistill config: schema, validation and conversion to Ray Tune.

A search config is a complete distill config (what ``raydistill distill`` takes) plus a ``search``
section.  ``raydistill.config`` keeps ``search`` as a raw dict; this module owns its schema::

    search:
      space:                               # config key path -> distribution (list entries by index)
        distill.temperature: {dist: loguniform, low: 1.0, high: 20.0}
        distill.terms.2.weight: {dist: uniform, low: 0.0, high: 1.0}      # a loss term's weight
        distill.alpha:       {dist: uniform, low: 0.0, high: 1.0}
        compression.sparsity: {dist: choice, values: [0.0, 0.5, 0.8, 0.9, 0.95]}
      metric: val_accuracy                 # what ASHA / single-objective searchers optimise
      mode: max
      num_samples: 16
      max_concurrent: null                 # null: floor(cluster CPUs / CPUs per trial), >= 1
      scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: fifo}
      searcher: {type: random, seed: 0}    # random | grid | optuna (+ objectives: {...})

Everything is checked before Ray starts; every error names the offending key, e.g.
``search.space.distill.temprature: not a config key ...``.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")


class SearchSpaceError(ValueError):
    """An invalid ``search`` section. The message starts with the offending key path."""


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RangeDim(_Strict):
    """A continuous (or integer) range ``[low, high]`` (``randint``: ``high`` exclusive)."""

    dist: Literal["uniform", "loguniform", "quniform", "randint"]
    low: float
    high: float
    q: float | None = Field(default=None, gt=0, description="quniform step")

    @model_validator(mode="after")
    def _check(self) -> "RangeDim":
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high must be finite numbers, got low={self.low}, high={self.high}")
        if self.low >= self.high:
            raise ValueError(f"empty range: low ({self.low}) must be < high ({self.high})")
        if self.dist == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got low={self.low}")
        if self.dist == "quniform" and self.q is None:
            raise ValueError("quniform needs a step q > 0")
        if self.dist != "quniform" and self.q is not None:
            raise ValueError(f"q is only valid with dist quniform, not {self.dist}")
        if self.dist == "randint" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"randint needs integer bounds, got low={self.low}, high={self.high}")
        return self

    def values_to_check(self) -> list[Any]:
        if self.dist == "randint":
            return [int(self.low), int(self.high) - 1]
        if self.dist == "quniform":
            return [self.low, self.high]
        # an interior, non-round draw too: catches a continuous range on an integer key
        return [self.low, self.low + 0.3719 * (self.high - self.low), self.high]


class ChoiceDim(_Strict):
    """A finite set: ``choice`` is sampled, ``grid`` is enumerated (every value, every sample)."""

    dist: Literal["choice", "grid"]
    values: list[Any]

    @model_validator(mode="after")
    def _check(self) -> "ChoiceDim":
        if not self.values:
            raise ValueError(f"{self.dist} needs a non-empty list of values")
        return self

    def values_to_check(self) -> list[Any]:
        return list(self.values)


def _dim_kind(v: Any) -> str:
    d = v.get("dist") if isinstance(v, dict) else getattr(v, "dist", None)
    return "choice" if d in ("choice", "grid") else "range"


# Tagged union: an error in a choice dim reports only the choice schema's complaint, not both.
Dim = Annotated[
    Union[Annotated[RangeDim, Tag("range")], Annotated[ChoiceDim, Tag("choice")]],
    Discriminator(_dim_kind),
]


class SchedulerSpec(_Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=1, ge=1, description="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = Field(default=2.0, gt=1.0)
    max_t: int | None = Field(default=None, ge=1, description="default: distill.epochs")
    group_by: str | None = Field(
        default=None,
        description="a searched choice/grid key (e.g. compression.sparsity): ASHA compares a trial only with "
                    "trials sharing its value, so pruned trials are not stopped for losing to dense ones")


class SearcherSpec(_Strict):
    type: Literal["random", "grid", "optuna"] = "random"
    seed: int | None = None
    # optuna only: {metric: mode}. Two or more -> multi-objective (e.g. accuracy max, sparsity max).
    objectives: dict[str, Literal["max", "min"]] | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearcherSpec":
        if self.objectives is not None:
            if self.type != "optuna":
                raise ValueError(f"objectives are only supported by searcher optuna, not {self.type}")
            if not self.objectives:
                raise ValueError("objectives must name at least one metric")
        return self


class SearchSpec(_Strict):
    space: dict[str, Dim]
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(default=12, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    scheduler: SchedulerSpec = SchedulerSpec()
    searcher: SearcherSpec = SearcherSpec()
    trial_driver_cpu: float = Field(
        default=0.01, ge=0.0, lt=1.0,
        description="CPU reserved by each trial's driver function (it only waits on the Train controller)",
    )
    min_sparsity: float | None = Field(default=None, ge=0.0, le=1.0,
                                       description="default for --min-sparsity (best_config.yaml)")
    baseline: bool = Field(default=True, description="train the from-scratch student once for pareto.png")

    @model_validator(mode="after")
    def _check(self) -> "SearchSpec":
        if not self.space:
            raise ValueError("space must declare at least one key to search")
        if self.searcher.type == "grid":
            bad = [k for k, d in self.space.items() if d.dist not in ("choice", "grid")]
            if bad:
                raise ValueError(
                    f"searcher grid enumerates finite sets only; use dist choice or grid for: {', '.join(bad)}"
                )
        g = self.scheduler.group_by
        if g is not None:
            if self.scheduler.type != "asha":
                raise ValueError("scheduler.group_by only applies to scheduler asha")
            if g not in self.space:
                raise ValueError(f"scheduler.group_by {g!r} is not a searched key ({', '.join(self.space)})")
            if self.space[g].dist not in ("choice", "grid"):
                raise ValueError(f"scheduler.group_by {g!r} must be a choice/grid key, not {self.space[g].dist}")
        if self.searcher.type == "optuna":
            bad = [k for k, d in self.space.items() if d.dist == "grid"]
            if bad:
                raise ValueError(f"searcher optuna cannot enumerate dist grid; use choice for: {', '.join(bad)}")
        return self

    # -- derived ------------------------------------------------------------------------------
    @property
    def objectives(self) -> dict[str, str]:
        """{metric: mode} the searcher optimises (multi-objective only with optuna)."""
        if self.searcher.objectives:
            return dict(self.searcher.objectives)
        return {self.metric: self.mode}

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


# --------------------------------------------------------------------------------------------
# parsing + validation
# --------------------------------------------------------------------------------------------


def _fmt_loc(loc: tuple) -> str:
    # pydantic puts the union member name ("RangeDim"/"ChoiceDim") into loc; it's noise to a user.
    parts = [str(p) for p in loc if p not in ("range", "choice")]
    return ".".join(["search", *parts])


def _check_dist_names(raw: dict) -> None:
    space = raw.get("space")
    if space is None:
        raise SearchSpaceError("search.space: missing; declare at least one config key path -> distribution")
    if not isinstance(space, dict):
        raise SearchSpaceError(f"search.space: must be a mapping of config key path -> distribution, got {type(space).__name__}")
    for key, dim in space.items():
        if not isinstance(dim, dict):
            raise SearchSpaceError(
                f"search.space.{key}: must be a mapping like {{dist: uniform, low: 0, high: 1}}, got {dim!r}"
            )
        d = dim.get("dist")
        if d is None:
            raise SearchSpaceError(f"search.space.{key}: missing 'dist' (one of {', '.join(DISTRIBUTIONS)})")
        if d not in DISTRIBUTIONS:
            raise SearchSpaceError(
                f"search.space.{key}: unknown distribution {d!r}; choose one of {', '.join(DISTRIBUTIONS)}"
            )


def parse_search(raw: dict | None) -> SearchSpec:
    """Validate the raw ``search`` dict (schema only, no config key check). Raises SearchSpaceError."""
    if raw is None:
        raise SearchSpaceError("search: the config has no 'search' section (see tune_configs/mnist1d_search.yaml)")
    if not isinstance(raw, dict):
        raise SearchSpaceError(f"search: must be a mapping, got {type(raw).__name__}")
    _check_dist_names(raw)
    try:
        return SearchSpec.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{_fmt_loc(err['loc'])}: {msg}")
        raise SearchSpaceError("; ".join(lines)) from None


_MISSING = object()


def _step(cur: Any, part: str) -> tuple[Any, Any]:
    """(container key, child) of one path segment: a mapping's key or a list's index
    (``distill.terms.1.weight``); ``_MISSING`` when there is none."""
    if isinstance(cur, dict) and part in cur:
        return part, cur[part]
    if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
        return int(part), cur[int(part)]
    return None, _MISSING


def _get_path(data: dict, path: str) -> Any:
    cur: Any = data
    for part in path.split("."):
        _, cur = _step(cur, part)
        if cur is _MISSING:
            return _MISSING
    return cur


def _set_path(data: dict, path: str, value: Any) -> dict:
    """A deep copy of ``data`` with the existing key ``path`` set to ``value`` (SearchSpaceError if there is
    no such key: ``_step`` would otherwise give the key None and the value would be written under it)."""
    out = copy.deepcopy(data)
    cur = out
    parts = path.split(".")
    for part in parts[:-1]:
        cur = _step(cur, part)[1]
    key, old = _step(cur, parts[-1])
    if old is _MISSING:
        raise SearchSpaceError(f"search.space.{path}: not a config key")
    cur[key] = value
    return out


def check_space_against_config(
    spec: SearchSpec,
    base: dict,
    validate: Callable[[dict], Any],
) -> None:
    """Every space key must be a real, settable config value accepting the values the space can draw.

    ``base`` is the full config as a dict (``cfg.model_dump()``, so defaults are present) and
    ``validate`` builds the config from a dict (``Config.model_validate``) and raises on bad data.
    Each declared bound / choice value is written into ``base`` and validated, so a float range on an
    int key or a string on a float key fails here, naming the key, not in trial 7 after Ray started.
    """
    for key, dim in spec.space.items():
        where = f"search.space.{key}"
        if key == "search" or key.startswith("search."):
            raise SearchSpaceError(f"{where}: the search section itself cannot be searched")
        cur = _get_path(base, key)
        if cur is _MISSING:
            sections = ", ".join(k for k in base if k != "search")
            parent, _, leaf = key.rpartition(".")
            while "." in parent and _get_path(base, parent) is _MISSING:  # the deepest key that exists
                parent = parent.rpartition(".")[0]
            hint = ""
            if parent:
                p = _get_path(base, parent)
                if isinstance(p, dict):
                    hint = f" ({parent} has: {', '.join(sorted(p))})"
                elif isinstance(p, list):
                    hint = f" ({parent} is a list of {len(p)}: indices 0..{len(p) - 1})"
                elif p is None:
                    hint = f" ({parent} is not set: write it in the config to search inside it)"
            else:
                hint = f" (top-level sections: {sections})"
            raise SearchSpaceError(f"{where}: not a config key{hint}")
        if key == "distill.alpha" and _get_path(base, "distill.terms") not in (None, _MISSING):
            raise SearchSpaceError(f"{where}: distill.terms is set, so distill.alpha weighs nothing; search the "
                                   "terms' weights instead (distill.terms.<i>.weight)")
        if isinstance(cur, dict):
            raise SearchSpaceError(f"{where}: is a config section, not a value; name a key inside it "
                                   f"({', '.join(sorted(cur))})")
        for value in dim.values_to_check():
            try:
                validate(_set_path(base, key, value))
            except ValidationError as e:
                msgs = "; ".join(err["msg"] for err in e.errors())
                raise SearchSpaceError(f"{where}: value {value!r} is not valid for this key: {msgs}") from None
            except ValueError as e:  # ConfigError or other checks in the config loader
                raise SearchSpaceError(f"{where}: value {value!r} is not valid for this key: {e}") from None


MAX_CHECKED_COMBINATIONS = 256


def check_space_combinations(spec: SearchSpec, base: dict, validate: Callable[[dict], Any],
                             check: Callable[[Any], Any], prefix: str) -> int:
    """Every combination of the values the space can draw for the keys under ``prefix`` (choices and grids
    in full, ranges at their checked values), written into ``base``, validated and passed to ``check`` (e.g.
    the student's target shape against the teacher: an axis, heads dividing the hidden size), so a trial
    that cannot start fails here, naming its values. Skipped (0) above ``MAX_CHECKED_COMBINATIONS``.
    Returns how many were checked."""
    import itertools

    keys = [k for k in spec.space if k.startswith(prefix)]
    if not keys:
        return 0
    values = [spec.space[k].values_to_check() for k in keys]
    if math.prod(len(v) for v in values) > MAX_CHECKED_COMBINATIONS:
        return 0
    n = 0
    for combo in itertools.product(*values):
        data = base
        for k, v in zip(keys, combo):
            data = _set_path(data, k, v)
        where = ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo))
        try:
            check(validate(data))
        except (ValidationError, ValueError) as e:
            raise SearchSpaceError(f"search.space ({where}): {e}") from None
        n += 1
    return n


# The metrics whose direction is fixed (what each task alone reports: ``raydistill.tasks.Task.reported_metrics``).
LOWER_IS_BETTER = ("val_perplexity", "perplexity", "train_loss", "model_bytes", "latency_ms_b1", "latency_ms_b256")
HIGHER_IS_BETTER = ("val_accuracy", "accuracy", "macro_f1", "macro_precision", "macro_recall",
                    "next_token_accuracy", "teacher_agreement", "compression_ratio", "sparsity")


def task_only_metrics() -> dict[str, tuple[str, ...]]:
    """task name -> the per-epoch metrics only it reports."""
    from raydistill.tasks import TASKS, get_task

    return {name: get_task(name).reported_metrics for name in TASKS}


def check_metrics_for_task(spec: SearchSpec, task: str) -> None:
    """``search.metric`` / ``search.searcher.objectives`` must be reported by the config's task
    (``data.task``) and, where the direction is fixed, optimised the right way: a causal LM's search
    minimises ``val_perplexity``, a classifier's maximises ``val_accuracy``."""
    only = task_only_metrics()
    others = {m for t, ms in only.items() if t != task for m in ms} - set(only.get(task, ()))
    pairs = [("search.metric", spec.metric, spec.mode, "search.mode")]
    pairs += [(f"search.searcher.objectives.{m}", m, mode, f"search.searcher.objectives.{m}")
              for m, mode in (spec.searcher.objectives or {}).items()]
    ours = ", ".join(only.get(task, ()))
    for where, metric, mode, mode_key in pairs:
        if metric in others:
            raise SearchSpaceError(f"{where}: {metric!r} is not reported by a {task} task (data.task); "
                                   f"it reports {ours} (and train_loss, compression_ratio, sparsity, model_bytes)")
        if metric in LOWER_IS_BETTER and mode != "min":
            raise SearchSpaceError(f"{mode_key}: {metric} is lower-is-better; set min, not {mode}")
        if metric in HIGHER_IS_BETTER and mode != "max":
            raise SearchSpaceError(f"{mode_key}: {metric} is higher-is-better; set max, not {mode}")


# --------------------------------------------------------------------------------------------
# conversion to Ray Tune
# --------------------------------------------------------------------------------------------


def to_tune_param_space(spec: SearchSpec) -> dict[str, Any]:
    """Flat ``{key path: ray.tune domain}``; a trial's config maps the same key paths to values."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, dim in spec.space.items():
        if isinstance(dim, ChoiceDim):
            if dim.dist == "grid" or spec.searcher.type == "grid":
                out[key] = tune.grid_search(list(dim.values))
            else:
                out[key] = tune.choice(list(dim.values))
        elif dim.dist == "uniform":
            out[key] = tune.uniform(dim.low, dim.high)
        elif dim.dist == "loguniform":
            out[key] = tune.loguniform(dim.low, dim.high)
        elif dim.dist == "quniform":
            out[key] = tune.quniform(dim.low, dim.high, dim.q)
        elif dim.dist == "randint":
            out[key] = tune.randint(int(dim.low), int(dim.high))
        else:  # pragma: no cover - schema forbids it
            raise SearchSpaceError(f"search.space.{key}: unknown distribution {dim.dist!r}")
    return out


def grid_size(spec: SearchSpec) -> int:
    """Number of grid points (1 if nothing is enumerated); Tune runs grid_size * num_samples trials."""
    n = 1
    for dim in spec.space.values():
        if isinstance(dim, ChoiceDim) and (dim.dist == "grid" or spec.searcher.type == "grid"):
            n *= len(dim.values)
    return n


def short_names(keys: list[str], reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """Key path -> report column: the last path segment (``temperature``) unless two keys share it
    or it is ``reserved`` (a metric column such as ``lr``); then the full key path."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 and leaf not in reserved else k) for k, leaf in zip(keys, leaves)}


def apply_trial_config(base: dict, trial_config: dict[str, Any]) -> dict:
    """The base config dict with a trial's ``{key path: value}`` written in (deep copy)."""
    out = copy.deepcopy(base)
    for key, value in trial_config.items():
        if _get_path(out, key) is _MISSING:
            raise SearchSpaceError(f"search.space.{key}: not a config key")
        out = _set_path(out, key, value)
    return out
