"""The live progress display of a job: polls each stage's ``epochs.jsonl`` (written by the rank-0 worker after
each report) and ``steps.jsonl`` (every ``log_every_steps`` optimizer steps), and shows a bar per stage in
optimizer steps of its budget (a terminal) or one plain line per epoch (logs, CI)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from raydistill.utils import new_jsonl_lines

log = logging.getLogger("raydistill")


class Progress:
    """One bar per stage. Its unit is the optimizer step of the stage's budget (issue 22): the workers' lines
    in ``epochs.jsonl`` and ``steps.jsonl`` carry ``global_step`` and ``total_steps``, so the bar, its rate
    and ETA follow steps (an epoch may take an hour), with the throughput (tokens/s or samples/s) beside
    the epoch's metrics. Until the first line arrives the bar counts epochs."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._stages: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._progress = None
        self._lines = False

    def note(self, text: str) -> None:
        """A warning for the user: above the bars in a terminal, else one line on stderr (and in the log)."""
        import sys

        log.warning(text)
        if self._progress is not None:
            self._progress.console.print(f"[yellow]warning:[/yellow] {text}", markup=True, highlight=False)
        else:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def add(self, stage: str, log_path: Path, epochs: int | None):
        with self._lock:
            self._stages[stage] = {"path": Path(log_path), "epochs": epochs, "offset": 0, "task": None,
                                   "last": None, "t0": time.time(), "steps_offset": 0, "total": None,
                                   "step": 0, "step0": None, "text": "starting ..."}

    def __enter__(self):
        import sys

        self._lines = self.enabled and not sys.stderr.isatty()  # logs/CI: one plain line per epoch
        if self.enabled and not self._lines:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._progress = RP(TextColumn("[bold]{task.description:<14}"), BarColumn(bar_width=24),
                                MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                transient=False, refresh_per_second=4)
            self._progress.__enter__()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def _loop(self):
        while not self._stop.wait(0.5):
            try:
                self.poll()
            except Exception:  # never let the display kill the job
                log.debug("progress poll failed", exc_info=True)

    @staticmethod
    def _new_lines(path: Path, st: dict, key: str) -> list[dict]:
        lines, st[key] = new_jsonl_lines(path, st[key])
        return lines

    def _step(self, st: dict, m: dict) -> None:
        """Steps of the budget done, and when the first one was seen (the ETA's rate)."""
        if m.get("total_steps"):
            st["total"] = int(m["total_steps"])
        if m.get("global_step") is not None:
            st["step"] = int(m["global_step"])
            if st["step0"] is None:
                st["step0"] = (st["step"], time.time())

    def _eta(self, st: dict) -> str:
        if not st["total"] or st["step0"] is None or st["step"] <= st["step0"][0]:
            return ""
        rate = (st["step"] - st["step0"][0]) / max(1e-9, time.time() - st["step0"][1])
        return f"  eta {(st['total'] - st['step']) / rate:.0f}s"

    def poll(self):
        with self._lock:
            for stage, st in self._stages.items():
                if st["task"] is None and self._progress is not None:
                    st["task"] = self._progress.add_task(stage, total=st["epochs"], metrics="starting ...")
                for m in self._new_lines(st["path"].with_name("steps.jsonl"), st, "steps_offset"):
                    self._step(st, m)
                    if self._progress is not None and st["task"] is not None and st["total"]:
                        self._progress.update(st["task"], total=st["total"], completed=st["step"],
                                              metrics=f"{st['text']}  {_rate_text(m)}")
                for m in self._new_lines(st["path"], st, "offset"):
                    st["last"] = m
                    self._step(st, m)
                    log.info("%s epoch %s/%s: %s", stage, m.get("epoch"), st["epochs"],
                             {k: m.get(k) for k in ("train_loss", "val_accuracy", "accuracy", "val_perplexity",
                                                    "perplexity", "sparsity", "lr", "global_step")})
                    txt = st["text"] = _epoch_text(m)
                    if self._lines:
                        import sys

                        steps = f"step {st['step']}/{st['total']}  " if st["total"] else ""
                        print(f"[{stage}] epoch {m['epoch']}/{m.get('epochs') or st['epochs']}  {steps}{txt}  "
                              f"{_rate_text(m)}{self._eta(st)}", file=sys.stderr, flush=True)
                    if self._progress is not None and st["task"] is not None:
                        if st["total"]:
                            self._progress.update(st["task"], total=st["total"], completed=st["step"],
                                                  metrics=f"{txt}  {_rate_text(m)}")
                        else:
                            self._progress.update(st["task"], completed=int(m["epoch"]), metrics=txt)

    def done(self, stage: str, note: str = ""):
        with self._lock:
            st = self._stages.get(stage)
            if st and self._progress is not None and st["task"] is not None:
                total = st["total"] or st["epochs"]
                self._progress.update(st["task"], total=total, completed=total,
                                      metrics=note or self._progress.tasks[st["task"]].fields["metrics"])


def _rate_text(m: dict) -> str:
    mem = f"  peak {m['peak_memory_mib'] / 1024:.2f} GiB" if m.get("peak_memory_mib") else ""
    if m.get("tokens_per_s"):
        return f"{m['tokens_per_s']:,.0f} tok/s{mem}"
    return f"{m['samples_per_s']:,.0f} samples/s{mem}" if m.get("samples_per_s") else mem.strip()


def _epoch_text(m: dict) -> str:
    if "perplexity" in m:
        return (f"loss {m['train_loss']:.3f}  val ppl {m['val_perplexity']:.2f}  test ppl {m['perplexity']:.2f}  "
                f"sparsity {m['sparsity']:.2f}")
    return (f"loss {m['train_loss']:.3f}  val {m['val_accuracy']:.3f}  test {m['accuracy']:.3f}  "
            f"sparsity {m['sparsity']:.2f}")
