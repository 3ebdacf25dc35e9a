"""``raydistill distill`` and ``raydistill teacher-logits``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one clear line (no traceback, no usage wall)."""

    def error(self, message):  # noqa: D401
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: the embedded tune_configs/mnist1d_default.yaml)")
    p.add_argument("--storage-path", default=None, help="where runs, checkpoints and caches go (default ./runs)")
    p.add_argument("--name", default=None, help="run name (default: run.name from the config)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers per stage")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (default: $RAY_ADDRESS or "
                                                   "a local instance sized to this machine)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML), e.g. --set distill.temperature=2; repeatable")


def _load(args) -> "object":
    from raydistill.config import load_config

    overrides = list(args.overrides)
    if args.num_workers is not None:
        if args.num_workers < 1:
            raise _UsageError(f"--num-workers must be >= 1, got {args.num_workers}")
        overrides.append(f"scaling.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides.append("scaling.use_gpu=true")
    return load_config(args.config, overrides)


class _UsageError(Exception):
    pass


def _check_name_and_storage(args, name: str, storage) -> None:
    """--name / run.name is a name, not a path; the storage path is a writable directory (ConfigError)."""
    from raydistill.config import validate_run_name
    from raydistill.distill.preflight import check_storage

    validate_run_name(name, "--name" if args.name else "run.name")
    check_storage(storage, "--storage-path" if args.storage_path else "run.storage_path")


def _fail(prog: str, msg: str, code: int) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    prog = "raydistill distill"
    p = _Parser(prog=prog, description="Distil (and prune) a student from a teacher with Ray Train; writes "
                                       "<storage-path>/<name>/report.json, report.md and curves.png.")
    _common(p)
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    args = p.parse_args(argv)
    from raydistill.config import ConfigError

    try:
        cfg = _load(args)
    except (ConfigError, _UsageError) as exc:
        return _fail(prog, str(exc), 2)
    from raydistill.distill.pipeline import run_distill
    from raydistill.distill.data import resolve_storage

    storage = resolve_storage(args.storage_path, cfg)
    name = args.name or cfg.run.name
    try:
        _check_name_and_storage(args, name, storage)
    except ConfigError as exc:
        return _fail(prog, str(exc), 2)
    log_path = storage / name / "distill.log"
    from raydistill.distill import interrupts

    resume = shlex.join(["raydistill", "distill", *(sys.argv[1:] if argv is None else argv)])
    stopped = (f"interrupted; the checkpoints of finished epochs are kept. To resume, run the same command "
               f"again:\n  {resume}\n(log: {log_path})")
    try:
        with interrupts.handle_interrupts(on_force=f"{prog}: {stopped}\n(forced exit: killed the run's "
                                                   f"processes after a second Ctrl-C or a 20 s grace period)"):
            report = run_distill(cfg, storage_path=storage, name=name, address=args.address,
                                 progress=not args.no_progress)
    except KeyboardInterrupt:
        return _fail(prog, stopped, interrupts.EXIT_INTERRUPTED)
    except BaseException as exc:  # noqa: BLE001 - an interrupted run may surface as any error
        if interrupts.interrupted():
            return _fail(prog, stopped, interrupts.EXIT_INTERRUPTED)
        return _error(prog, exc, log_path)
    _print_summary(report)
    print(Path(report["run_dir"]) / "report.json")
    return 0


def _error(prog: str, exc: BaseException, log_path: Path) -> int:
    from raydistill.config import ConfigError
    from raydistill.distill.pipeline import StageFailed

    if isinstance(exc, ConfigError):
        return _fail(prog, str(exc), 2)
    if isinstance(exc, StageFailed):
        return _fail(prog, f"{exc}\nfull log: {log_path}", 1)
    if not isinstance(exc, Exception):
        raise exc
    # one clear line; the traceback goes to the log
    import logging
    import traceback

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as fh:
        fh.write("".join(traceback.format_exception(exc)))
    logging.getLogger("raydistill").debug("failed", exc_info=True)
    return _fail(prog, f"{type(exc).__name__}: {exc}\nfull log: {log_path}", 1)


def _print_summary(r: dict) -> None:
    """The final table on stderr (stage names in full, also in a log or CI, where the console is not a
    terminal and would otherwise be 80 columns wide), then the verdict on distillation."""
    from rich.console import Console
    from rich.table import Table

    from raydistill.distill.report import _latency, _teacher_ci, _with_ci, pruned_vs_random_text, stage_label

    console = Console(stderr=True, **({} if sys.stderr.isatty() else {"width": 200}))
    t = Table(title=f"raydistill run {r['name']} ({r['wall_seconds']:.0f} s)")
    teacher = "teacher" + (" (cached)" if r["teacher"].get("cached") else "")
    if r.get("task") == "causal_lm":
        for col in ("stage", "test perplexity (95% CI)", "next-token acc", "teacher agreement", "sparsity",
                    "nonzero params"):
            t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
        tm = r["teacher"].get("metrics") or {}
        t.add_row(teacher, _with_ci(tm.get("perplexity"), _teacher_ci(r), "{:.2f}"),
                  f"{r['teacher']['accuracy']:.2%}", "", "", "")
        for key in ("baseline", "dense_student", "student"):
            if key in r:
                e = r[key]
                t.add_row(stage_label(r, key), _with_ci(e["perplexity"], e.get("perplexity_ci95"), "{:.2f}"),
                          f"{e['next_token_accuracy']:.2%}", f"{e.get('teacher_agreement', float('nan')):.2%}",
                          f"{e['sparsity']:.1%}", f"{e['nonzero_params']:,}")
    else:
        cols = ("stage", "test accuracy (95% CI)", "macro recall", "macro F1", "sparsity", "compression",
                "bytes", "ms/b1", "ms/b256")
        for col in cols:
            t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
        t.add_row(teacher, _with_ci(r["teacher"]["accuracy"], _teacher_ci(r), "{:.2%}"), *[""] * (len(cols) - 2))

        def fmt(v, f):
            return "" if v is None else format(v, f)

        rows = [(a["stage"], a) for a in r.get("assistants", [])]
        rows += [(k, r[k]) for k in ("baseline", "dense_student", "dense_student_ptq", "student") if k in r]
        for key, e in rows:
            t.add_row(key, _with_ci(e["accuracy"], e.get("accuracy_ci95"), "{:.2%}"), fmt(e.get("macro_recall"), ".3f"),
                      fmt(e.get("macro_f1"), ".3f"), fmt(e.get("sparsity"), ".1%"),
                      fmt(e.get("compression_ratio"), ".2f") + "x", fmt(e.get("model_bytes"), ","),
                      _latency(e, "latency_ms_b1").replace("\\", ""), _latency(e, "latency_ms_b256").replace("\\", ""))
    console.print(t)
    if r.get("pruned_vs_random_init"):
        console.print(pruned_vs_random_text(r["pruned_vs_random_init"]), highlight=False)
    if any(isinstance(e, dict) and e.get("latency_under_load") for e in r.values()):
        console.print("* latency measured while other processes used the CPU: not the model's latency",
                      highlight=False)
    v = r.get("verdict") or {}
    if v.get("summary"):
        style = {"helped": "green", "hurt": "bold red"}.get(v.get("verdict"), "yellow")
        from rich.text import Text

        console.print(Text(v["summary"][0].upper() + v["summary"][1:] + ".", style=style))


def teacher_logits_main(argv: list[str] | None = None) -> int:
    prog = "raydistill teacher-logits"
    p = _Parser(prog=prog, description="Run the (cached) teacher once over the labelled train rows and the "
                                       "transfer set with Ray Data map_batches on a pool of actors; write "
                                       "top-k logits + indices to parquet (use with distill.teacher_outputs).")
    _common(p)
    p.add_argument("--output", "-o", default=None, help="parquet directory (default <storage>/teacher_outputs/"
                                                        "<teacher-hash>-k<topk>)")
    p.add_argument("--topk", type=int, default=None, help="logits kept per row (default distill.topk)")
    p.add_argument("--concurrency", type=int, default=None, help="teacher actors (default: 1 on < 4 CPUs, else CPUs/2, max 4)")
    args = p.parse_args(argv)
    from raydistill.config import ConfigError

    try:
        cfg = _load(args)
        if args.topk is not None and cfg.data.task == "classification" and not 1 <= args.topk <= 10:
            raise _UsageError(f"--topk must be in 1..10 (MNIST-1D has 10 classes), got {args.topk}")
        if args.topk is not None and args.topk < 1:
            raise _UsageError(f"--topk must be >= 1, got {args.topk}")
        if args.concurrency is not None and args.concurrency < 1:
            raise _UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
    except (ConfigError, _UsageError) as exc:
        return _fail(prog, str(exc), 2)
    from raydistill.distill.teacher_logits import write_teacher_outputs
    from raydistill.distill.data import resolve_storage

    storage = resolve_storage(args.storage_path, cfg)
    try:
        from raydistill.distill.preflight import check_models, check_storage

        check_storage(storage, "--storage-path" if args.storage_path else "run.storage_path")
        check_models(cfg)
    except ConfigError as exc:
        return _fail(prog, str(exc), 2)
    try:
        out = write_teacher_outputs(cfg, storage_path=storage, output=args.output, topk=args.topk,
                                    concurrency=args.concurrency, address=args.address)
    except ConfigError as exc:
        return _fail(prog, str(exc), 2)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except Exception as exc:  # noqa: BLE001
        return _fail(prog, f"{type(exc).__name__}: {exc}", 1)
    print(out)
    return 0
