"""The live progress display of a job: polls each stage's ``epochs.jsonl`` (written by the rank-0 worker after
each report) and shows a bar per stage (a terminal) or one plain line per epoch (logs, CI)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger("raydistill")


class Progress:
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

    def add(self, stage: str, log_path: Path, epochs: int):
        with self._lock:
            self._stages[stage] = {"path": Path(log_path), "epochs": epochs, "offset": 0, "task": None,
                                   "last": None, "t0": time.time()}

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

    def poll(self):
        with self._lock:
            for stage, st in self._stages.items():
                if st["task"] is None and self._progress is not None:
                    st["task"] = self._progress.add_task(stage, total=st["epochs"], metrics="starting ...")
                p = st["path"]
                if not p.is_file():
                    continue
                with open(p) as fh:
                    fh.seek(st["offset"])
                    chunk = fh.read()
                    if not chunk.endswith("\n"):
                        chunk = chunk[: chunk.rfind("\n") + 1]
                    st["offset"] += len(chunk)
                for line in chunk.splitlines():
                    try:
                        m = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    st["last"] = m
                    log.info("%s epoch %s/%s: %s", stage, m.get("epoch"), st["epochs"],
                             {k: m.get(k) for k in ("train_loss", "val_accuracy", "accuracy", "val_perplexity",
                                                    "perplexity", "sparsity", "lr")})
                    txt = _epoch_text(m)
                    if self._lines:
                        import sys

                        el = time.time() - st["t0"]
                        eta = el / max(1, int(m["epoch"])) * (st["epochs"] - int(m["epoch"]))
                        print(f"[{stage}] epoch {m['epoch']}/{st['epochs']}  {txt}  eta {eta:.0f}s",
                              file=sys.stderr, flush=True)
                    if self._progress is not None and st["task"] is not None:
                        self._progress.update(st["task"], completed=int(m["epoch"]), metrics=txt)

    def done(self, stage: str, note: str = ""):
        with self._lock:
            st = self._stages.get(stage)
            if st and self._progress is not None and st["task"] is not None:
                self._progress.update(st["task"], completed=st["epochs"],
                                      metrics=note or self._progress.tasks[st["task"]].fields["metrics"])


def _epoch_text(m: dict) -> str:
    if "perplexity" in m:
        return (f"loss {m['train_loss']:.3f}  val ppl {m['val_perplexity']:.2f}  test ppl {m['perplexity']:.2f}  "
                f"sparsity {m['sparsity']:.2f}")
    return (f"loss {m['train_loss']:.3f}  val {m['val_accuracy']:.3f}  test {m['accuracy']:.3f}  "
            f"sparsity {m['sparsity']:.2f}")
