"""Real searches through Ray Tune + Ray Train on a local 2-CPU Ray (tiny data, 3 epochs).

* more trials than CPUs, ASHA stopping some, and the search still ends with every placement group
  removed (the stopped trials' CPUs come back: Ray issue #54305 is what would hang it otherwise);
* all four report files; best_config.yaml loads with the distill config loader;
* an interrupted search resumed with --resume, finished trials not rerun;
* Optuna multi-objective (accuracy max, sparsity max) through Tune.

A hang fails the test instead of blocking CI: a timer sends SIGUSR1 (Tune's own graceful interrupt,
the search then returns unfinished and the asserts fail), and faulthandler kills the run as a last
resort.
"""

from __future__ import annotations

import csv
import faulthandler
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

TINY = Path(__file__).parent / "configs" / "tiny_search.yaml"
SOFT_TIMEOUT_S = float(os.environ.get("RAYDISTILL_TUNE_TEST_TIMEOUT_S", "420"))


@pytest.fixture
def ray_2cpu():
    import ray

    from raydistill.distill import ray_session

    if ray.is_initialized():
        ray.shutdown()
    with ray_session(num_cpus=2):
        assert os.environ["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
        yield ray


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    # shared by the module's searches: the teacher and the baseline are trained once, then cached
    return tmp_path_factory.mktemp("tune_storage")


class _Timeout(Exception):
    pass


@contextmanager
def hang_guard(seconds: float = SOFT_TIMEOUT_S):
    """SIGUSR1 after ``seconds``: inside Tuner.fit it is Tune's graceful interrupt (the search returns
    unfinished, rc 130); elsewhere our handler raises. faulthandler exits hard at 1.5x as a backstop."""

    def handler(sig, frame):
        raise _Timeout(f"search did not finish within {seconds:.0f}s")

    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds * 1.5, exit=True)
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGUSR1, old)


def run_tune(*argv: str) -> tuple[int, float]:
    from raydistill.tune.cli import main

    t0 = time.monotonic()
    with hang_guard():
        rc = main(list(argv))
    return rc, time.monotonic() - t0


def read_trials(exp: Path) -> list[dict]:
    with open(exp / "trials.csv") as f:
        return list(csv.DictReader(f))


def wait_all_placement_groups_removed(ray, timeout_s: float = 60.0) -> dict:
    """Placement groups still holding resources (state != REMOVED) once the search ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = {k: v for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(1.0)


def test_search_more_trials_than_cpus_asha_stops_some_and_finishes(ray_2cpu, storage):
    ray = ray_2cpu
    assert ray.cluster_resources()["CPU"] == 2
    rc, wall = run_tune(str(TINY), "--storage-path", str(storage), "--name", "e2e", "--num-samples", "6",
                        "--set", "run.tracking=tensorboard")
    exp = storage / "e2e"
    assert rc == 0, f"raydistill tune returned {rc} after {wall:.0f}s"

    rows = read_trials(exp)
    assert len(rows) == 6 > ray.cluster_resources()["CPU"]
    assert {r["status"] for r in rows} == {"TERMINATED"}, rows
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped, "ASHA stopped no trial: the test would not exercise the stopped-trial cleanup"
    for r in stopped:
        assert int(r["epochs_run"]) < int(r["epochs_configured"]) == 3
    for r in rows:
        assert 0 < float(r["accuracy"]) <= 1 and float(r["compression_ratio"]) > 0
        assert r["checkpoint_path"] and Path(r["checkpoint_path"]).is_dir()
        assert 1.0 <= float(r["temperature"]) <= 10.0 and 0 <= float(r["alpha"]) <= 1
        assert float(r["sparsity"]) in (0.0, 0.5, 0.9)

    # the stopped trials' placement groups were removed: all CPUs are free again
    live = wait_all_placement_groups_removed(ray)
    assert not live, f"placement groups leaked after the search: {live}"
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0)

    doc = json.loads((exp / "pareto.json").read_text())
    front = doc["front"]
    assert front and doc["teacher_accuracy"] is not None and doc["baseline_accuracy"] is not None
    from raydistill.tune.pareto import dominates

    finished = [r for r in rows if r["status"] == "TERMINATED"]
    pts = [{"accuracy": float(r["accuracy"]), "compression_ratio": float(r["compression_ratio"])} for r in finished]
    for p in front:
        assert not any(dominates(q, p) for q in pts), p
        assert {"temperature", "alpha", "sparsity", "accuracy", "compression_ratio", "trial_id",
                "checkpoint_path"} <= set(p)
    # every trial not on the front is dominated by one that is
    on = {p["trial_id"] for p in front}
    for r, pt in zip(finished, pts):
        if r["trial_id"] not in on:
            assert any(dominates(q, pt) for q in front), r

    png = exp / "pareto.png"
    assert png.read_bytes()[:4] == b"\x89PNG"

    # run.tracking=tensorboard (issue 22): Ray's TBX logger wrote every trial's epochs under <search>/tensorboard,
    # read back with TensorBoard's own EventAccumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in rows:
        ea = EventAccumulator(str(exp / "tensorboard" / r["trial_id"])).Reload()
        tag = next(t for t in ea.Tags()["scalars"] if t.endswith("/accuracy"))
        vals = ea.Scalars(tag)
        assert len(vals) == int(r["epochs_run"]) and vals[-1].value == pytest.approx(float(r["accuracy"]))
    summary = EventAccumulator(str(exp / "tensorboard" / "search"), size_guidance={"tensors": 0}).Reload()
    assert "pareto.json/text_summary" in summary.Tags()["tensors"]

    from raydistill.config import load_config

    best = load_config(exp / "best_config.yaml")  # what `raydistill distill` does with it
    assert best.search is None
    best_row = max(finished, key=lambda r: float(r["val_accuracy"]))
    assert best.distill.temperature == pytest.approx(float(best_row["temperature"]))
    assert best.compression.sparsity == pytest.approx(float(best_row["sparsity"]))


@pytest.fixture
def no_ray():
    """As on the command line: each `raydistill tune` call starts (and shuts down) its own Ray; an
    interrupted search's process, and its Ray, are gone when --resume runs."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    assert not ray.is_initialized()


def test_interrupted_search_resumes_without_rerunning_finished_trials(no_ray, storage):
    name = "resume"
    exp = storage / name
    rc, _ = run_tune(str(TINY), "--storage-path", str(storage), "--name", name, "--num-samples", "4",
                     "--interrupt-after-trials", "2")
    assert rc == 130, "the search should report itself interrupted"
    first = {r["trial_id"]: r for r in read_trials(exp)}
    done_first = {t: r for t, r in first.items() if r["status"] == "TERMINATED"}
    assert len(done_first) >= 2 and len(done_first) < 4, first
    # what each finished trial's Ray Train run logged (one line per epoch trained)
    logs = {t: (exp / "train" / f"trial_{t}" / "epochs.jsonl").read_text() for t in done_first}
    assert all(logs.values())

    # a new search under the same name is refused; --resume continues it
    rc_again, _ = run_tune(str(TINY), "--storage-path", str(storage), "--name", name)
    assert rc_again == 2
    rc, _ = run_tune("--resume", "--storage-path", str(storage), "--name", name)
    assert rc == 0
    rows = {r["trial_id"]: r for r in read_trials(exp)}
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"TERMINATED"}, rows
    for t, r in done_first.items():
        # not rerun: same metrics, and its Train run trained no further epoch
        assert (exp / "train" / f"trial_{t}" / "epochs.jsonl").read_text() == logs[t]
        for k in ("accuracy", "val_accuracy", "epochs_run", "checkpoint_path"):
            assert rows[t][k] == r[k], (t, k)
    assert len(list((exp / "train").glob("trial_*"))) == 4
    for f in ("trials.csv", "pareto.json", "pareto.png", "best_config.yaml"):
        assert (exp / f).is_file(), f


def test_optuna_multi_objective_search_survives_a_worker_crash(ray_2cpu, storage, tmp_path):
    """Optuna multi-objective (accuracy max, sparsity max) through Tune; every trial's worker dies once
    mid-epoch 2 (run.debug_crash_at_epoch), Tune retries the trial (run.max_failures) and its Ray Train
    run resumes from the epoch-1 checkpoint."""
    import yaml

    from raydistill.distill.worker import CRASH_MARKER

    data = yaml.safe_load(TINY.read_text())
    data["search"]["searcher"] = {"type": "optuna", "seed": 1, "objectives": {"accuracy": "max", "sparsity": "max"}}
    data["search"]["scheduler"] = {"type": "fifo"}
    data["distill"]["epochs"] = 2
    data["run"]["debug_crash_at_epoch"] = 2
    cfg = tmp_path / "optuna.yaml"
    cfg.write_text(yaml.safe_dump(data))
    rc, _ = run_tune(str(cfg), "--storage-path", str(storage), "--name", "optuna", "--num-samples", "2",
                     "--min-sparsity", "0.5")
    exp = storage / "optuna"
    rows = read_trials(exp)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}, rows
    assert all(r["stopped_early"] == "False" and r["epochs_run"] == "2" for r in rows)  # fifo: no stops
    for r in rows:  # the crash happened and the trial still finished
        assert (exp / "train" / f"trial_{r['trial_id']}" / CRASH_MARKER).is_file()
    if any(float(r["sparsity"]) >= 0.5 for r in rows):
        assert rc == 0
        from raydistill.config import load_config

        assert load_config(exp / "best_config.yaml").compression.sparsity >= 0.5
    else:  # no trial satisfies --min-sparsity: reported, best_config.yaml not written, rc 1
        assert rc == 1 and not (exp / "best_config.yaml").exists()


def test_lm_search_minimises_perplexity(ray_2cpu, storage, tmp_path):
    """The shipped `lm_search` (its search section: space, val_perplexity / min, ASHA by sparsity) on
    lm_tiny's models and 20 kB of corpus, 2 trials (sparsity 0 and 0.75): the front, best_config.yaml
    and the teacher / baseline lines are perplexities, lower is better."""
    import yaml

    from raydistill.config import load_config, shipped_config_path
    from raydistill.tune.pareto import dominates

    data = yaml.safe_load(shipped_config_path("lm_search.yaml").read_text())
    tiny = yaml.safe_load(shipped_config_path("lm_tiny.yaml").read_text())
    for k in ("teacher", "student", "data"):
        data[k] = tiny[k]
    data["teacher"]["training"]["epochs"] = 1
    data["data"].update(max_bytes=20000, val_fraction=0.2)
    data["distill"]["epochs"] = 2
    data["search"]["space"]["compression.sparsity"] = {"dist": "grid", "values": [0.0, 0.75]}
    data["search"]["num_samples"] = 1
    cfg = tmp_path / "lm_search_tiny.yaml"
    cfg.write_text(yaml.safe_dump(data))
    rc, wall = run_tune(str(cfg), "--storage-path", str(storage), "--name", "lm")
    exp = storage / "lm"
    assert rc == 0, f"raydistill tune returned {rc} after {wall:.0f}s"

    rows = read_trials(exp)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}, rows
    assert {float(r["sparsity"]) for r in rows} == {0.0, 0.75}
    for r in rows:
        assert 1 < float(r["perplexity"]) < 384 and 1 < float(r["val_perplexity"]) < 384
        assert 0 <= float(r["next_token_accuracy"]) <= 1 and "accuracy" not in r
    dense, sparse = sorted(rows, key=lambda r: float(r["sparsity"]))
    # (at 50% an fp32 CSR layer, values + int32 column ids, is no smaller than dense: 75% is)
    assert float(sparse["model_bytes"]) < float(dense["model_bytes"])
    assert float(sparse["compression_ratio"]) > 1.0 == float(dense["compression_ratio"])

    doc = json.loads((exp / "pareto.json").read_text())
    assert doc["objectives"] == {"perplexity": "min", "compression_ratio": "max"}
    assert 1 < doc["teacher_perplexity"] < 384 and 1 < doc["baseline_perplexity"] < 384
    objectives = ("-perplexity", "compression_ratio")
    pts = [{"trial_id": r["trial_id"], "perplexity": float(r["perplexity"]),
            "compression_ratio": float(r["compression_ratio"])} for r in rows]
    on = {p["trial_id"] for p in doc["front"]}
    for p in pts:  # the front is exactly the trials no other trial beats on (lower perplexity, more compression)
        assert (p["trial_id"] in on) == (not any(dominates(q, p, objectives) for q in pts)), (p, pts)
    assert set(doc["fronts"]) == {"perplexity_bytes", "perplexity_params", "perplexity_latency"}
    # one sequence's CPU latency, timed again after the search; the students have one shape (no size fronts)
    assert all(float(r["latency_ms_b1"]) > 0 and r["latency_ms_b256"] == "" for r in rows)
    assert float(dense["model_params"]) == float(sparse["model_params"]) and not (exp / "pareto_size.png").exists()

    best = load_config(exp / "best_config.yaml")
    best_row = min(rows, key=lambda r: float(r["val_perplexity"]))
    assert best.compression.sparsity == pytest.approx(float(best_row["sparsity"]))
    assert best.distill.temperature == pytest.approx(float(best_row["temperature"]))
