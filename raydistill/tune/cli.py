"""``raydistill tune``: Ray Tune search over temperature / alpha / sparsity + the Pareto report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_SEARCH_CONFIG_NAME = "mnist1d_search.yaml"  # shipped in tune_configs/ (config.shipped_config_path)
SAVED_CONFIG = "search_config.yaml"  # the resolved config of a search, inside its experiment dir
STATE_FILE = "search_state.json"

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def check_models_and_terms(spec, base: dict) -> None:
    """Before Ray starts: the models and loss terms of the base config (``check_models``), and of each
    value a loss-term or teacher key can draw (hidden-layer maps, teacher weights): a layer that does not
    exist fails here, naming the search key, not in a trial."""
    from raydistill.config import ConfigError, config_from_dict
    from raydistill.distill.preflight import check_models
    from raydistill.tune.space import SearchSpaceError, apply_trial_config

    check_models(config_from_dict(base))
    for key, dim in spec.space.items():
        if not key.startswith(("distill.terms.", "teachers.")):
            continue
        for value in dim.values_to_check():
            try:
                check_models(config_from_dict(apply_trial_config(base, {key: value})))
            except ConfigError as exc:
                raise SearchSpaceError(f"search.space.{key}: value {value!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raydistill tune",
        description="Ray Tune search over distillation temperature, alpha and sparsity (each trial a "
                    "Ray Train run); writes trials.csv, pareto.json, pareto.png and best_config.yaml "
                    "under <storage-path>/<name>/.",
    )
    p.add_argument("config", nargs="?", default=None,
                   help=f"search config: a distill config + a 'search' section, a path or the name of a shipped "
                        f"one (lm_search, mnist1d_compress_search; default: {DEFAULT_SEARCH_CONFIG_NAME}; "
                        "with --resume: the config saved with the search)")
    p.add_argument("--num-samples", type=int, default=None, help="trials to sample (overrides search.num_samples)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: floor(cluster CPUs / CPUs per trial), at least 1)")
    p.add_argument("--storage-path", default=None, help="root folder for results (default: run.storage_path)")
    p.add_argument("--name", default=None,
                   help="search name = folder under the storage path (default: <run.name>_search_<timestamp>; "
                        "with --resume: the most recent search there)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.path=value",
                   help="override a config value (repeatable), e.g. --set distill.epochs=3")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (finished trials are not rerun)")
    p.add_argument("--min-sparsity", type=float, default=None,
                   help="best_config.yaml: best trial among those with compression.sparsity >= this")
    p.add_argument("--interrupt-after-trials", type=int, default=None, metavar="N",
                   help="testing aid: interrupt the search (as Ctrl-C would) once N trials have finished")
    return p


def _err(console, msg: str) -> None:
    console.print(f"[bold red]raydistill tune:[/bold red] {msg}", highlight=False)


def _latest_search(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    cands = [d for d in root.iterdir() if d.is_dir() and (d / SAVED_CONFIG).exists()]
    return max(cands, key=lambda d: d.stat().st_mtime) if cands else None


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:  # piped / CI: rich would assume 80 columns and truncate the table
        console = Console(highlight=False, soft_wrap=True, width=int(os.environ.get("COLUMNS", 140)))
    t_start = time.monotonic()

    from raydistill.config import ConfigError, load_config
    from raydistill.tune.space import (
        SearchSpaceError,
        check_metrics_for_task,
        check_space_against_config,
        check_space_combinations,
        parse_search,
    )

    if args.name is not None:
        from raydistill.config import validate_run_name

        try:
            validate_run_name(args.name, "--name")  # a name, not a path (same rule as run.name)
        except ConfigError as exc:
            _err(console, str(exc))
            return EXIT_USAGE

    # ---- resolve the config (before Ray starts: every config / space error surfaces here) ----
    def _root(cfg_) -> Path:
        return Path(os.path.expanduser(args.storage_path or cfg_.run.storage_path or "runs")).resolve()

    exp_dir: Path | None = None
    if args.config:
        from raydistill.config import resolve_config_path

        config_path = resolve_config_path(args.config)  # a path, or a shipped config's name (lm_search)
    else:
        from raydistill.config import shipped_config_path

        try:
            config_path = shipped_config_path(DEFAULT_SEARCH_CONFIG_NAME)
        except ConfigError as exc:
            _err(console, str(exc))
            return EXIT_USAGE
    if not config_path.exists():
        _err(console, f"config file not found: {config_path}")
        return EXIT_USAGE
    if args.resume:
        # The search continues with the config saved when it started (Tune restores its own space);
        # CONFIG, if given, only says where the storage path is.
        if args.overrides:
            _err(console, "--set cannot change a search being resumed; it keeps the config it started with")
            return EXIT_USAGE
        try:
            root = _root(load_config(config_path))
        except (ConfigError, OSError) as e:
            _err(console, f"{config_path}: {e}")
            return EXIT_USAGE
        exp_dir = (root / args.name) if args.name else _latest_search(root)
        if exp_dir is None or not (exp_dir / SAVED_CONFIG).exists():
            _err(console, f"--resume: no search to resume under {root}"
                          + (f" named {args.name!r}" if args.name else "") + f" (no {SAVED_CONFIG})")
            return EXIT_USAGE
        config_path = exp_dir / SAVED_CONFIG

    try:
        cfg = load_config(config_path, overrides=args.overrides)
    except (ConfigError, OSError) as e:
        _err(console, f"{config_path}: {e}")
        return EXIT_USAGE

    try:
        spec = parse_search(cfg.search)
        upd = {}
        if args.num_samples is not None:
            if args.num_samples < 1:
                raise SearchSpaceError(f"--num-samples must be >= 1, got {args.num_samples}")
            upd["num_samples"] = args.num_samples
        if args.max_concurrent is not None:
            if args.max_concurrent < 1:
                raise SearchSpaceError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
            upd["max_concurrent"] = args.max_concurrent
        if args.min_sparsity is not None:
            if not 0.0 <= args.min_sparsity <= 1.0:
                raise SearchSpaceError(f"--min-sparsity must be in [0, 1], got {args.min_sparsity}")
            upd["min_sparsity"] = args.min_sparsity
        if upd:
            spec = spec.model_copy(update=upd)
        base = cfg.model_dump(mode="json")
        check_space_against_config(spec, base, type(cfg).model_validate)
        check_metrics_for_task(spec, cfg.data.task)
        check_models_and_terms(spec, base)
        from raydistill.distill.preflight import check_inputs
        from raydistill.distill.student_init import check_student_init

        # student.init.from: teacher: every searched target shape fits the teacher (issue 21)
        check_space_combinations(spec, base, type(cfg).model_validate, check_student_init, "student.init.")
        check_inputs(cfg)  # teacher checkpoint / outputs and the corpus's files, before Ray starts
    except (SearchSpaceError, ConfigError) as e:
        _err(console, str(e))
        return EXIT_USAGE

    if exp_dir is None:
        name = args.name or f"{cfg.run.name}_search_{time.strftime('%Y%m%d-%H%M%S')}"
        exp_dir = _root(cfg) / name
        from raydistill.utils import check_output_dir

        try:  # a file, a symbolic link or someone else's non-empty directory is never written into
            check_output_dir(exp_dir, key="--name" if args.name else "search directory", marker=SAVED_CONFIG,
                             error=ConfigError)
        except ConfigError as exc:
            _err(console, str(exc))
            return EXIT_USAGE
        if exp_dir.exists() and any(exp_dir.iterdir()):
            _err(console, f"{exp_dir} already holds a search; pass --resume to continue it or a new --name")
            return EXIT_USAGE

    try:  # run.tracking: the backend installed, its store writable (before Ray starts; issue 22)
        from raydistill.distill.tracking import check_tracking

        check_tracking(cfg, exp_dir.parent, exp_dir.name)
        if cfg.distill.epochs is None:
            raise ConfigError("distill.max_steps / distill.max_tokens: a search compares trials at whole epochs "
                              "(ASHA's time unit, the report's epochs); give distill.epochs instead")
    except ConfigError as e:
        _err(console, str(e))
        return EXIT_USAGE

    from raydistill.tune.runner import run_search
    from raydistill.utils import no_space_left

    logging.raiseExceptions = False  # a log that cannot be written (a full disk) is not a traceback per record
    try:
        return run_search(
            cfg, spec, exp_dir=exp_dir, address=args.address, resume=args.resume, console=console,
            interrupt_after=args.interrupt_after_trials, t_start=t_start,
            saved_config_name=SAVED_CONFIG, state_name=STATE_FILE,
        )
    except ConfigError as e:  # e.g. no Ray cluster at --address, a bad corpus file found while reading it
        _err(console, str(e))
        return EXIT_USAGE
    except Exception as e:
        full = no_space_left(e)
        if not full:
            raise
        _err(console, f"no space left on device writing to {getattr(full, 'filename', None) or exp_dir}; "
                      f"finished trials are kept: free space there and continue with --resume")
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
