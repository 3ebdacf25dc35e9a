"""Offline teacher outputs: run the teacher once over the distillation rows with Ray Data and keep, per token,
its top-k log-probabilities, their ids and the log of its mass outside them, compressed (``cm`` by default for
vocabularies up to 4096 ids, else ``q8``; a sixth to a fifth of the raw bytes) or raw, in parquet shards that
``distill.teacher_outputs`` reads through ``kd_loss_topk`` instead of running the teacher in every step of every run.

The job: the input rows (``Task.teacher_inputs``: the packed train blocks of a causal LM; MNIST-1D's train rows
and transfer set) are cut into shards of ``shard_rows`` rows; a Ray Data dataset of the shards still to write flows through
``map_batches`` on a pool of teacher actors (:class:`TeacherShardWriter`: the teacher loaded once per actor,
one GPU each when the cluster has GPUs, else a fractional CPU each), and each actor writes its shard
``part-<start>-<stop>.parquet`` atomically (a temporary name, then a rename). A shard's bytes depend only on
its rows, the teacher and the codec, so an interrupted run, run again with the same arguments, keeps the
finished shards and writes the missing ones: the same files as an uninterrupted run. The whole pipeline runs
under a deadline (``timeout_s``) and Ray Data's wait for the actor pool is bounded, so a starved pipeline
fails with a clear error.

Beside the shards, ``teacher_logits.json`` records bytes per token, tokens per second and the codec's
measured fidelity (mean KL between the exact and the decoded top-k distributions on a sample of every
shard's tokens). Format and codecs: ``raydistill.data.topk_cache`` and ``raydistill.data.topk_codec``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from raydistill.config import Config, ConfigError
from raydistill.data.topk_cache import REPORT_FILE, CacheError, CacheMeta, read_meta, shard_name, shard_plan
from raydistill.data.topk_codec import CodecSpec
from raydistill.utils import EXPORT_MARKER, check_output_dir

log = logging.getLogger("raydistill")

PROGRESS_FILE = ".shards.jsonl"   # one line per written shard (its stats), appended by the actors
TOKENS_PER_SHARD = 1 << 16        # default shard size: this many tokens' worth of rows (rows x tokens per row)
FIDELITY_TOKENS = 512             # tokens per shard whose decoded top-k is compared with the exact one


class TeacherShardWriter:
    """Ray Data callable class: one teacher per actor. Each call gets shard ranges (``start``, ``stop``),
    runs the teacher over those input rows, encodes its top-k outputs, writes the shard and returns the
    shard's stats (file, bytes, tokens, seconds, fidelity on a sample)."""

    def __init__(self, model: dict, path: str, inputs, out_dir: str, meta: dict, *, use_gpu: bool = False,
                 task_info: dict | None = None, batch_rows: int = 16, compression: str = "zstd",
                 compression_level: int | None = 9, fidelity_tokens: int = FIDELITY_TOKENS,
                 debug_fail_after_shards: int | None = None):
        import ray
        import torch

        from raydistill.distill.checkpointing import load_weights
        from raydistill.tasks import get_task

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.meta = dict(meta)
        self.info = dict(task_info or {})
        self.task = get_task(self.meta["task"])
        self.model = self.task.build_model(model, self.info)
        load_weights(self.model, path)
        self.model.to(self.device).eval()
        self.inputs = ray.get(inputs) if isinstance(inputs, ray.ObjectRef) else inputs
        self.out = Path(out_dir)
        self.batch_rows = int(batch_rows)
        self.compression, self.level = compression, compression_level
        self.fidelity_tokens = int(fidelity_tokens)
        self.written = 0
        self.fail_after = int(debug_fail_after_shards or 0)

    def _forward(self, rows: dict):
        """(values, indices, tail) of the rows: ``(rows, [S,] k)`` float32 / int64 and ``(rows, [S])`` or None."""
        import torch

        from raydistill.data.topk_codec import topk_from_logits

        k, tail_t = int(self.meta["k"]), self.meta["tail_temperature"]
        outs = []
        with torch.no_grad():
            for i in range(0, len(next(iter(rows.values()))), self.batch_rows):
                logits = self.task.teacher_logits(self.model, {c: a[i:i + self.batch_rows] for c, a in rows.items()},
                                                  self.device, self.info)
                outs.append([None if t is None else t.cpu().numpy() for t in topk_from_logits(logits, k, tail_t)])
        values, indices = (np.concatenate([o[j] for o in outs]) for j in (0, 1))
        tail = None if tail_t is None else np.concatenate([o[2] for o in outs])
        return values, indices.astype(np.int64), tail

    def write(self, start: int, stop: int) -> dict:
        from raydistill.data.topk_cache import read_shard, shard_table, write_shard
        from raydistill.data.topk_codec import fidelity

        t0 = time.perf_counter()
        rows = {c: a[start:stop] for c, a in self.inputs.items()}
        values, indices, tail = self._forward(rows)
        meta = CacheMeta(**{**self.meta, "rows": stop - start, "start": start, "stop": stop})
        name = shard_name(start, stop)
        nbytes = write_shard(self.out / name, shard_table(meta, rows, values, indices, tail),
                             compression=self.compression, compression_level=self.level)
        seconds = time.perf_counter() - t0
        # fidelity: the shard read back from disk against the exact outputs, on evenly spaced tokens
        back = read_shard(self.out / name)
        k = meta.k
        n_tok = len(values.reshape(-1, k))
        sel = np.unique(np.linspace(0, n_tok - 1, min(n_tok, self.fidelity_tokens)).astype(np.int64))

        def sample(a, width=None):
            return None if a is None else (a.reshape(-1, width) if width else a.reshape(-1))[sel]

        fid = fidelity(sample(values, k), sample(indices, k), sample(tail), sample(back["topk_values"], k),
                       sample(back["topk_indices"], k), sample(back.get("topk_tail")),
                       temperature=meta.tail_temperature or 1.0)
        stats = {"file": name, "start": start, "stop": stop, "bytes": nbytes, "tokens": n_tok,
                 "seconds": round(seconds, 4), "sample_tokens": len(sel), **fid}
        with open(self.out / PROGRESS_FILE, "a") as fh:  # one short line: atomic with O_APPEND
            fh.write(json.dumps(stats) + "\n")
        self.written += 1
        if self.fail_after and self.written >= self.fail_after:  # tests: an interrupted run
            raise RuntimeError(f"debug_fail_after_shards={self.fail_after}: stopping after {self.written} shards")
        return stats

    def __call__(self, batch: dict) -> dict:
        stats = [self.write(int(a), int(b)) for a, b in zip(batch["start"], batch["stop"])]
        return {key: np.array([s[key] for s in stats]) for key in stats[0]} if stats else {}


def default_output(storage: Path, teacher_hash: str, topk: int, codec: str = "cm") -> Path:
    return storage / "teacher_outputs" / f"{teacher_hash}-k{topk}-{codec}"


def companding_gamma(temperature: float) -> float:
    """The codecs' companding exponent for outputs a loss reads at ``temperature``: ``1 / (2 T)``, at most 1
    (``raydistill.data.topk_codec``: the decoded distribution's KL is then about ``k / (6 (L - 1)^2)``
    whatever the teacher)."""
    return min(1.0, 0.5 / float(temperature))


def codec_spec(codec: str | CodecSpec | None, temperature: float, *, value_levels: int | None = None) -> CodecSpec:
    """A codec by name, with ``value_levels`` (None: from the codec's target KL) and its companding exponent
    matched to the loss temperature (:func:`companding_gamma`), or the given spec; a ConfigError naming the
    argument (``--codec`` / ``--value-levels``) otherwise."""
    if isinstance(codec, CodecSpec):
        return codec
    try:
        return CodecSpec(name=codec or "auto", value_levels=value_levels, gamma=companding_gamma(temperature))
    except ValueError as exc:
        raise ConfigError(f"{'--value-levels' if str(exc).startswith('value_levels') else '--codec'}: {exc}") from None


def _prepare_output(out: Path, template: CacheMeta, plan: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Create ``out`` or check it holds only shards of this same cache; returns the shards still to write
    (a resumed run skips the finished ones). Never deletes anything but its own temporary files and shards
    that cannot be read (an interrupted write)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {out} is a file; teacher-logits writes a directory of shards")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / EXPORT_MARKER).is_file():  # what check_output_dir looks for before a later (resumed) run
        (out / EXPORT_MARKER).write_text(json.dumps({"written_by": "raydistill", "what": "teacher-logits"}) + "\n")
    ours = {REPORT_FILE, PROGRESS_FILE, EXPORT_MARKER}
    done = set()
    plan_set = set(plan)
    ident = template.identity()
    for f in sorted(out.iterdir()):
        if f.name.startswith(".part-") and ".tmp-" in f.name:
            f.unlink()  # a write interrupted before its rename
            continue
        if f.name in ours:
            continue
        if not (f.is_file() and f.name.startswith("part-") and f.suffix == ".parquet"):
            raise ConfigError(f"--output: {out} holds {f.name!r}, which is not a teacher-logits shard; write to a "
                              "new or empty directory (or one this command wrote before)")
        try:
            m = read_meta(f)
        except CacheError as exc:
            log.warning("teacher-logits: %s; writing that shard again", exc)
            f.unlink()
            continue
        if m is None or m.identity() != ident:
            diff = "no metadata" if m is None else ", ".join(sorted(a for a, b in m.identity().items() if ident[a] != b))
            raise ConfigError(f"--output: {f} was written by another teacher-logits run (differs in: {diff}); "
                              "choose another --output, or delete that directory to rewrite it")
        if (m.start, m.stop) not in plan_set or f.name != shard_name(m.start, m.stop):
            raise ConfigError(f"--output: {f} covers rows [{m.start}, {m.stop}), not a shard of this run's plan "
                              f"({len(plan)} shards of {plan[0][1] - plan[0][0] if plan else 0} rows); resume with the "
                              "same --shard-rows")
        done.add((m.start, m.stop))
    return [s for s in plan if s not in done]


def _read_progress(out: Path) -> dict[str, dict]:
    stats = {}
    p = out / PROGRESS_FILE
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                s = json.loads(line)
                stats[s["file"]] = s
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
    return stats


def build_report(out: Path, template: CacheMeta, plan: list[tuple[int, int]], *, written: list[str],
                 wall_seconds: float, compression: str, compression_level) -> dict:
    """The run's report (``teacher_logits.json``): totals over all shards, the speed of this run, the codec's
    fidelity (token-weighted over the shards' samples)."""
    from raydistill.utils import write_json_atomic

    progress = _read_progress(out)
    shards = []
    for a, b in plan:
        name = shard_name(a, b)
        s = dict(progress.get(name, {"file": name, "start": a, "stop": b}))
        s["bytes"] = (out / name).stat().st_size
        s["tokens"] = (b - a) * template.tokens_per_row
        shards.append(s)
    tokens = sum(s["tokens"] for s in shards)
    nbytes = sum(s["bytes"] for s in shards)
    new_tokens = sum(s["tokens"] for s in shards if s["file"] in set(written))
    sampled = [s for s in shards if "kl_topk" in s]
    n_sample = sum(s["sample_tokens"] for s in sampled)

    def mean(key):
        vals = [(s[key], s["sample_tokens"]) for s in sampled if key in s]
        return sum(v * n for v, n in vals) / max(1, sum(n for _, n in vals)) if vals else None

    report = {
        "format": template.format, "version": template.version, "codec": template.codec,
        "compression": {"codec": compression, "level": compression_level}, "task": template.task, "k": template.k,
        "vocab_size": template.vocab_size, "tail_temperature": template.tail_temperature,
        "teacher_hash": template.teacher_hash, "tokenizer_hash": template.tokenizer_hash,
        "rows": plan[-1][1] if plan else 0, "tokens": tokens, "bytes": nbytes,
        "bytes_per_token": nbytes / max(1, tokens),
        "tokens_per_s": new_tokens / wall_seconds if written and wall_seconds > 0 else None,
        "written_shards": len(written), "resumed_shards": len(plan) - len(written), "wall_seconds": wall_seconds,
        "fidelity": {"temperature": template.tail_temperature or 1.0, "kl_topk": mean("kl_topk"),
                     "kl_with_tail": mean("kl_with_tail"), "sample_tokens": n_sample},
        "shards": shards,
    }
    write_json_atomic(out / REPORT_FILE, report)
    return report


def write_teacher_outputs(cfg: Config, *, storage_path=None, output=None, topk: int | None = None,
                          concurrency: int | None = None, address: str | None = None, timeout_s: float = 900.0,
                          codec: str | CodecSpec | None = None, shard_rows: int | None = None, tail: bool = True,
                          tail_temperature: float | None = None, compression: str = "zstd",
                          compression_level: int | None = 9, debug_fail_after_shards: int | None = None) -> Path:
    """Train/load the teacher, then write its top-k outputs over the train (+ transfer) rows as parquet shards
    (resuming an interrupted run); returns the directory. ``codec``: ``"auto"`` (default: ``"cm"`` for a
    vocabulary of at most 4096 ids, else ``"q8"``), ``"cm"``, ``"q8"``, ``"raw"`` or a
    :class:`~raydistill.data.topk_codec.CodecSpec`; ``tail``: store the log mass outside the top-k at
    ``tail_temperature`` (default ``distill.temperature``). ``debug_fail_after_shards`` (tests): each teacher
    actor raises after writing that many shards, an interrupted run."""
    from raydistill.data.topk_cache import tokenizer_hash
    from raydistill.distill.session import ray_session
    from raydistill.distill.data import resolve_storage
    from raydistill.distill.teachers import ensure_teacher

    from raydistill.tasks import get_task

    if cfg.offline_teacher() == next(iter(cfg.teacher_map())):
        raise ConfigError(f"{cfg.teacher_outputs_key()} is set: teacher-logits writes those outputs; unset it")
    task = get_task(cfg.data.task)
    k = int(topk or cfg.distill.topk)
    if k < 1 or (task.max_topk is not None and k > task.max_topk):
        rule = ">= 1" if task.max_topk is None else f"in 1..{task.max_topk} (the task has {task.max_topk} classes)"
        raise ConfigError(f"distill.topk must be {rule}, got {k}")
    if shard_rows is not None and (isinstance(shard_rows, bool) or int(shard_rows) < 1):
        raise ConfigError(f"--shard-rows must be >= 1, got {shard_rows}")
    loss_t = float(tail_temperature or cfg.distill.temperature)
    if not 0 < loss_t <= 100:
        raise ConfigError(f"--tail-temperature must be in (0, 100], got {tail_temperature}")
    spec = codec_spec(codec, loss_t)
    storage = resolve_storage(storage_path, cfg)
    out_key = "--output" if output else "teacher-logits output directory"
    if output:  # before Ray starts
        check_output_dir(output, key=out_key, error=ConfigError)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": str(storage)})})
    with ray_session(address=address) as ray:
        teacher = ensure_teacher(cfg, storage)
        inputs, info = task.teacher_inputs(cfg, storage)
        V = task.output_size(info)
        if k > V:
            raise ConfigError(f"distill.topk ({k}) exceeds the output distribution's {V} ids (the vocabulary)")
        try:
            resolved = spec.resolved(k, V)
        except ValueError as exc:
            raise ConfigError(f"--codec: {exc}") from None
        out = Path(output).expanduser().absolute() if output else default_output(storage, teacher.config_hash, k,
                                                                                  resolved.name)
        check_output_dir(out, key=out_key, error=ConfigError)  # empty, or an earlier output of ours
        n_rows = len(next(iter(inputs.values())))
        per_row = task.tokens_per_row(inputs)
        rows_per_shard = int(shard_rows or max(1, TOKENS_PER_SHARD // per_row))
        template = CacheMeta(codec=resolved.to_dict(), k=k, vocab_size=V, task=cfg.data.task,
                             tokens_per_row=per_row, rows=0, start=0, stop=0, input_columns=list(inputs),
                             teacher_hash=teacher.config_hash,
                             tokenizer_hash=tokenizer_hash(info["tokenizer_dir"]) if info.get("tokenizer_dir") else None,
                             tail_temperature=loss_t if tail and k < V else None)
        plan = shard_plan(n_rows, rows_per_shard)
        pending = _prepare_output(out, template, plan)
        t0 = time.time()
        if pending:
            _run_pool(ray, pending, teacher, inputs, out, template, info, concurrency, timeout_s, compression,
                      compression_level, debug_fail_after_shards)
        wall = time.time() - t0
        missing = [shard_name(a, b) for a, b in plan if not (out / shard_name(a, b)).is_file()]
        if missing:
            raise RuntimeError(f"teacher-logits: the pipeline finished but {len(missing)} shards are missing "
                               f"({missing[:3]}...)")
        build_report(out, template, plan, written=[shard_name(a, b) for a, b in pending], wall_seconds=wall,
                     compression=compression, compression_level=compression_level)
    return out


def _run_pool(ray, pending, teacher, inputs, out: Path, template: CacheMeta, info: dict, concurrency, timeout_s,
              compression, compression_level, debug_fail_after_shards=None) -> None:
    """The Ray Data job: the pending shard ranges through ``map_batches`` on the pool of teacher actors."""
    import ray.data
    from ray.data import DataContext

    from raydistill.tasks import get_task

    gpus = ray.cluster_resources().get("GPU", 0)
    n, actor_cpus = _pool_size(ray, concurrency, gpus)
    n = min(n, len(pending))
    ctx = DataContext.get_current()
    old_wait = ctx.wait_for_min_actors_s
    # never wait forever for the actor pool (Ray Data's default): if the actors cannot be scheduled (the
    # cluster's CPUs are held by other work) fail with a clear error instead of hanging
    ctx.wait_for_min_actors_s = int(min(timeout_s, 300))
    try:
        ds = ray.data.from_items([{"start": a, "stop": b} for a, b in pending], override_num_blocks=len(pending))
    finally:
        ctx.wait_for_min_actors_s = old_wait
    meta = {k: v for k, v in vars(template).items() if k not in ("rows", "start", "stop")}
    ds = ds.map_batches(
        TeacherShardWriter, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n),
        fn_constructor_kwargs={"model": teacher.model, "path": teacher.path, "inputs": ray.put(inputs),
                               "out_dir": str(out), "meta": meta, "use_gpu": gpus > 0, "task_info": info,
                               "batch_rows": get_task(template.task).teacher_batch_rows,
                               "compression": compression, "compression_level": compression_level,
                               "debug_fail_after_shards": debug_fail_after_shards},
        # fractional CPUs: the actors leave room for the pipeline's other tasks (and for whatever else runs
        # on the cluster), or on a small node the pool can starve the pipeline
        num_gpus=1 if gpus > 0 else None, num_cpus=None if gpus > 0 else actor_cpus)
    _run_with_deadline(ds.take_all, timeout_s, ray)


def summary_line(report: dict, out: Path) -> str:
    fid = report["fidelity"]
    kl = "" if fid["kl_topk"] is None else (
        f", fidelity KL {fid['kl_topk']:.2e} nats (top-k)"
        + ("" if fid["kl_with_tail"] is None else f" / {fid['kl_with_tail']:.2e} (with tail)")
        + f" at T={fid['temperature']:g} on {fid['sample_tokens']:,} tokens")
    speed = "" if report["tokens_per_s"] is None else f", {report['tokens_per_s']:,.0f} tokens/s"
    return (f"teacher-logits: {report['tokens']:,} tokens, k={report['k']}, codec {report['codec']['name']}: "
            f"{report['bytes_per_token']:.1f} bytes/token ({report['bytes'] / 1e6:.2f} MB){speed}{kl}; "
            f"{report['written_shards']} shards written, {report['resumed_shards']} kept -> {out}")


def _pool_size(ray, concurrency: int | None, gpus: float) -> tuple[int, float]:
    """Teacher actors and CPUs per actor, from the cluster's resources: on a small CPU node one or two
    actors with a fractional CPU each, so the pool can never take every CPU the pipeline's tasks need."""
    if concurrency is not None and int(concurrency) < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    cpus = float(ray.cluster_resources().get("CPU", 1))
    free = float(ray.available_resources().get("CPU", 0.0))
    if gpus > 0:
        return int(concurrency or max(1, int(gpus))), 0.0
    n = int(concurrency or (1 if cpus < 4 else min(4, int(cpus // 2))))
    # each actor gets at most half a CPU, and together at most half of what is free now (>= 0.1 each)
    per = max(0.1, min(0.5, round(max(free, 0.2) / (2 * n), 2)))
    return n, per


def _run_with_deadline(fn, timeout_s: float, ray) -> None:
    """Run the Ray Data pipeline in a thread and fail (instead of hanging) after ``timeout_s``."""
    import threading

    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    th = threading.Thread(target=target, name="teacher-logits", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise TimeoutError(
            f"teacher-logits: the Ray Data pipeline did not finish within {timeout_s:.0f} s (cluster CPUs "
            f"{ray.cluster_resources().get('CPU')}, free now {ray.available_resources().get('CPU', 0)}); "
            "other work may hold the cluster's resources. Re-run with a larger timeout or on an idle cluster.")
    if "error" in box:
        raise box["error"]
