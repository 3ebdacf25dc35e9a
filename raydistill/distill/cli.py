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


def _quiet_log_errors() -> None:
    """A log handler that cannot write (a full disk) drops the record instead of printing a traceback for
    each one: the command's own error line says what went wrong."""
    import logging

    logging.raiseExceptions = False


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

    _quiet_log_errors()
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
        return _error(prog, exc, log_path, storage)
    _print_summary(report)
    print(Path(report["run_dir"]) / "report.json")
    return 0


def _error(prog: str, exc: BaseException, log_path: Path | None, storage: Path | None = None) -> int:
    """One clear line for a failed run (rc 2 for a config error, else 1); the traceback goes to the log
    when the log can be written, and writing it never raises."""
    from raydistill.config import ConfigError
    from raydistill.distill.pipeline import StageFailed
    from raydistill.utils import no_space_left

    if isinstance(exc, ConfigError):
        return _fail(prog, str(exc), 2)
    if not isinstance(exc, Exception):
        raise exc
    full = no_space_left(exc)
    if full:
        where = getattr(full, "filename", None) or storage or (log_path and log_path.parent)
        _append_log(log_path, exc)
        return _fail(prog, f"no space left on device writing to {where}; what was written before it (finished "
                           f"epochs' checkpoints, caches) is kept: free space there and run the same command "
                           f"again", 1)
    if isinstance(exc, StageFailed):
        return _fail(prog, f"{exc}\nfull log: {log_path}", 1)
    msg = f"{type(exc).__name__}: {exc}"
    if log_path is not None:
        msg += f"\nfull log: {log_path}" if _append_log(log_path, exc) else "\n(the log could not be written)"
    return _fail(prog, msg, 1)


def _append_log(log_path: Path | None, exc: BaseException) -> bool:
    """Append ``exc``'s traceback to the run's log; False (never an exception) if that fails."""
    import traceback

    if log_path is None:
        return False
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as fh:
            fh.write("".join(traceback.format_exception(exc)))
        return True
    except OSError:
        return False


def _print_summary(r: dict) -> None:
    """The report's table (the task's columns, ``raydistill.distill.report.stage_rows``) on stderr (stage names
    in full, also in a log or CI, where the console is not a terminal and would otherwise be 80 columns
    wide), then the verdict on distillation."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from raydistill.distill.report import UNDER_LOAD_NOTE, cell, pruned_vs_random_text, stage_rows
    from raydistill.tasks import get_task

    console = Console(stderr=True, **({} if sys.stderr.isatty() else {"width": 200}))
    cols = get_task(r["task"]).report_columns
    t = Table(title=f"raydistill run {r['name']} ({r['wall_seconds']:.0f} s)")
    for col in ("stage", *(h for h, _, _ in cols)):
        t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    cached = {f"teacher:{n}" for n, m in (r.get("teachers") or {}).items() if m.get("cached")}
    cached |= {"teacher"} if r["teacher"].get("cached") else set()
    rows = stage_rows(r)
    for stage, _, e in rows:
        t.add_row(stage + (" (cached)" if stage in cached else ""), *(cell(e, k, f, mark="*") for _, k, f in cols))
    console.print(t)
    if r.get("pruned_vs_random_init"):
        console.print(pruned_vs_random_text(r), highlight=False)
    if any(e.get("latency_under_load") for _, _, e in rows):
        console.print(f"* latency {UNDER_LOAD_NOTE}", highlight=False)
    v = r.get("verdict") or {}
    if v.get("summary"):
        style = {"helped": "green", "hurt": "bold red"}.get(v.get("verdict"), "yellow")
        console.print(Text(v["summary"][0].upper() + v["summary"][1:] + ".", style=style))


def teacher_logits_main(argv: list[str] | None = None) -> int:
    prog = "raydistill teacher-logits"
    p = _Parser(prog=prog, description="Run the (cached) teacher once over the train rows (and the transfer "
                                       "set) with Ray Data map_batches on a pool of actors; write its top-k "
                                       "log-probabilities, ids and tail mass as compressed parquet shards (use "
                                       "with distill.teacher_outputs). An interrupted run, run again, keeps its "
                                       "finished shards.")
    _common(p)
    p.add_argument("--output", "-o", default=None, help="shard directory (default <storage>/teacher_outputs/"
                                                        "<teacher-hash>-k<topk>-<codec>)")
    p.add_argument("--topk", type=int, default=None, help="entries kept per token (default distill.topk)")
    p.add_argument("--concurrency", type=int, default=None, help="teacher actors (default: 1 on < 4 CPUs, else CPUs/2, max 4)")
    p.add_argument("--codec", choices=["auto", "cm", "q8", "raw"], default="auto",
                   help="cm: q8's codes range-coded under a context model (~90 bytes a token at k=128, V=1024; "
                        "vocabularies <= 4096); q8: packed ids + 8-bit values; raw: float32 / int32, exact; "
                        "auto (default): cm where the vocabulary allows, else q8")
    p.add_argument("--value-levels", type=int, default=None,
                   help="cm / q8: quantisation levels per value, 2..256 (default: from k, for KL ~7.5e-4)")
    p.add_argument("--shard-rows", type=int, default=None,
                   help="input rows per shard (default: 65536 tokens' worth of rows: blocks of a corpus, MNIST-1D rows)")
    p.add_argument("--no-tail", action="store_true", help="do not store the mass outside the top-k")
    p.add_argument("--tail-temperature", type=float, default=None,
                   help="temperature of the stored tail (default distill.temperature; the loss must use it)")
    p.add_argument("--compression-level", type=int, default=9, help="parquet zstd level (default 9)")
    args = p.parse_args(argv)
    from raydistill.config import ConfigError

    _quiet_log_errors()
    try:
        cfg = _load(args)
        from raydistill.tasks import get_task

        top = get_task(cfg.data.task).max_topk
        if args.topk is not None and top is not None and not 1 <= args.topk <= top:
            raise _UsageError(f"--topk must be in 1..{top} (the task has {top} classes), got {args.topk}")
        if args.topk is not None and args.topk < 1:
            raise _UsageError(f"--topk must be >= 1, got {args.topk}")
        if args.concurrency is not None and args.concurrency < 1:
            raise _UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
        if args.shard_rows is not None and args.shard_rows < 1:
            raise _UsageError(f"--shard-rows must be >= 1, got {args.shard_rows}")
        if args.tail_temperature is not None and not 0 < args.tail_temperature <= 100:
            raise _UsageError(f"--tail-temperature must be in (0, 100], got {args.tail_temperature}")
        from raydistill.distill.teacher_logits import codec_spec

        spec = codec_spec(args.codec, args.tail_temperature or cfg.distill.temperature, value_levels=args.value_levels)
    except (ConfigError, _UsageError) as exc:
        return _fail(prog, str(exc), 2)
    from raydistill.distill.data import resolve_storage
    from raydistill.distill.teacher_logits import summary_line, write_teacher_outputs

    storage = resolve_storage(args.storage_path, cfg)
    try:
        from raydistill.distill.preflight import check_inputs, check_models, check_storage

        check_storage(storage, "--storage-path" if args.storage_path else "run.storage_path")
        check_inputs(cfg, teacher_outputs=False)
        check_models(cfg)
    except ConfigError as exc:
        return _fail(prog, str(exc), 2)
    try:
        out = write_teacher_outputs(cfg, storage_path=storage, output=args.output, topk=args.topk,
                                    concurrency=args.concurrency, address=args.address, codec=spec,
                                    shard_rows=args.shard_rows, tail=not args.no_tail,
                                    tail_temperature=args.tail_temperature,
                                    compression_level=args.compression_level)
    except ConfigError as exc:
        return _fail(prog, str(exc), 2)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except Exception as exc:  # noqa: BLE001
        return _error(prog, exc, None, storage)
    import json

    from raydistill.data.topk_cache import REPORT_FILE

    print(summary_line(json.loads((out / REPORT_FILE).read_text()), out), file=sys.stderr)
    print(out)
    return 0
