"""Report files from hand-made trial rows (no Ray): trials.csv, pareto.json, pareto.png,
best_config.yaml (round trip through the distill config loader), resource plan."""

from __future__ import annotations

import csv
import json

import pytest

from raydistill.config import Config, config_from_dict, dump_config, load_config
from raydistill.tune import report as rep
from raydistill.tune.search import plan_resources


def row(tid, T, a, s, acc, cr, *, val=None, epochs=4, of=4, status="TERMINATED", extra=None):
    over = {"distill.temperature": T, "distill.alpha": a, "compression.sparsity": s}
    return {
        "trial_id": tid, "status": status, "stopped_early": status == "TERMINATED" and epochs < of,
        "epochs_run": epochs, "epochs_configured": of, "temperature": T, "alpha": a, "sparsity": s,
        "params": {"temperature": T, "alpha": a, "sparsity": s, **(extra or {})}, "overrides": over,
        "accuracy": acc, "val_accuracy": acc if val is None else val, "compression_ratio": cr,
        "achieved_sparsity": s, "train_loss": 0.1, "lr": 1e-3, "time_s": 5.0,
        "checkpoint_path": f"/ckpt/{tid}", "error": "",
    }


ROWS = [
    row("t0", 4.0, 0.5, 0.0, 0.80, 1.0),
    row("t1", 2.0, 0.9, 0.5, 0.82, 2.0),
    row("t2", 8.0, 0.7, 0.9, 0.78, 9.0),
    row("t3", 1.5, 0.1, 0.9, 0.60, 9.0, epochs=1),          # stopped early, dominated by t2
    row("t4", 3.0, 0.3, 0.95, 0.70, 18.0, epochs=2),        # stopped early but on the front
    row("t5", 3.0, 0.3, 0.95, None, None, status="ERROR"),  # no metrics
]


def test_front_summary_and_files(tmp_path):
    front = rep.compute_front(ROWS)
    assert [r["trial_id"] for r in front] == ["t1", "t2", "t4"]  # t0 dominated by t1
    s = rep.summarize(ROWS)
    assert s == {"trials": 6, "finished": 5, "stopped_early": 2, "errored": 1, "unfinished": 0,
                 "stopped_fraction": pytest.approx(2 / 6)}

    rep.write_trials_csv(ROWS, tmp_path / "trials.csv")
    with open(tmp_path / "trials.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 6
    for col in ("trial_id", "temperature", "alpha", "sparsity", "accuracy", "compression_ratio",
                "epochs_run", "stopped_early", "status"):
        assert col in got[0]
    assert got[3]["stopped_early"] == "True" and got[0]["stopped_early"] == "False"
    assert got[5]["status"] == "ERROR" and got[5]["accuracy"] == ""

    rep.write_pareto_json(front, tmp_path / "pareto.json", teacher=0.95, baseline=0.75)
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert doc["teacher_accuracy"] == 0.95 and [p["trial_id"] for p in doc["front"]] == ["t1", "t2", "t4"]
    for p in doc["front"]:
        for k in ("temperature", "alpha", "sparsity", "accuracy", "compression_ratio", "trial_id",
                  "checkpoint_path"):
            assert k in p

    png = rep.plot_pareto(ROWS, front, tmp_path / "pareto.png", teacher=0.95, baseline=0.75)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    md = rep.front_markdown(front)
    assert md.count("\n") == 4 and "| t4 |" in md
    from rich.console import Console

    c = Console(record=True, width=140)
    c.print(rep.front_table(front, teacher=0.95, baseline=0.75))
    out = c.export_text()
    assert "t2" in out and "teacher 0.9500" in out


def lm_row(tid, s, ppl, cr, *, val=None, status="TERMINATED", nbytes=None):
    r = row(tid, 1.0, 0.9, s, None, cr, status=status)
    r.update(accuracy=None, val_accuracy=None, perplexity=ppl, val_perplexity=ppl if val is None else val,
             next_token_accuracy=0.3, model_bytes=nbytes)
    return r


LM_ROWS = [
    lm_row("l0", 0.0, 30.0, 1.0, nbytes=4000),
    lm_row("l1", 0.0, 28.0, 1.0, nbytes=4000),    # dominates l0 (lower perplexity, same size)
    lm_row("l2", 0.5, 31.0, 1.5, nbytes=2500),
    lm_row("l3", 0.5, 35.0, 1.5, nbytes=2400),    # worse perplexity, not smaller by compression_ratio
    lm_row("l4", 0.9, 33.0, 2.5, status="ERROR"),
]


def test_lm_front_minimises_perplexity(tmp_path):
    """A causal LM's front is (perplexity down, compression up): the accuracy front would be empty and
    a maximised perplexity would pick the worst trials."""
    q = rep.quality_for("causal_lm")
    assert (q.key, q.mode, q.objectives()) == ("perplexity", "min", ("-perplexity", "compression_ratio"))
    front = rep.compute_front(LM_ROWS, q.objectives())
    assert [r["trial_id"] for r in front] == ["l1", "l2"]
    assert rep.compute_front(LM_ROWS) == []  # the accuracy objectives: no row has accuracy
    fronts = rep.compute_fronts(LM_ROWS, q)
    # by bytes, l3 (2400 bytes) is smaller than l2: both on the bytes front; no latency for an LM
    assert {k: [r["trial_id"] for r in v] for k, v in fronts.items()} == {
        "perplexity_bytes": ["l1", "l2", "l3"], "perplexity_params": [], "perplexity_latency": []}
    assert not rep.sizes_differ(LM_ROWS)  # no parameter counts: not a shape search
    assert rep.select_best(LM_ROWS, "val_perplexity", "min")["trial_id"] == "l1"
    assert rep.select_best(LM_ROWS, "val_perplexity", "min", min_sparsity=0.5)["trial_id"] == "l2"

    rep.write_pareto_json(front, tmp_path / "pareto.json", teacher=20.0, baseline=32.0, quality=q)
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert doc["objectives"] == {"perplexity": "min", "compression_ratio": "max"}
    assert doc["teacher_perplexity"] == 20.0 and doc["baseline_perplexity"] == 32.0
    assert [p["perplexity"] for p in doc["front"]] == [28.0, 31.0]
    rep.write_trials_csv(LM_ROWS, tmp_path / "trials.csv")
    with open(tmp_path / "trials.csv") as f:
        got = list(csv.DictReader(f))
    assert "perplexity" in got[0] and "val_perplexity" in got[0] and "accuracy" not in got[0]
    png = rep.plot_pareto(LM_ROWS, front, tmp_path / "pareto.png", teacher=20.0, baseline=32.0, quality=q)
    assert png.stat().st_size > 10_000
    assert "| perplexity |" in rep.front_markdown(front, q) and "| 28.00 |" in rep.front_markdown(front, q)
    with pytest.raises(ValueError, match="no search quality metric"):
        rep.quality_for("segmentation")


def shape_row(tid, layers, ppl, params, ms, *, status="TERMINATED"):
    r = lm_row(tid, 0.0, ppl, 1.0, status=status)
    r["params"] = {"num_hidden_layers": layers}
    r["overrides"] = {"student.init.num_hidden_layers": layers}
    r.update(model_params=params, latency_ms_b1=ms)
    return r


SHAPE_ROWS = [
    shape_row("s1", 1, 40.0, 660_000, 1.0),
    shape_row("s2", 2, 36.0, 655_000, 1.6),   # smaller and better than s1: s1 is off the parameter front
    shape_row("s4", 4, 35.0, 690_000, 2.9),
    shape_row("s8", 8, 34.0, 2_000_000, 6.0),
    shape_row("sx", 3, None, None, None, status="ERROR"),
]


def test_shape_search_fronts_over_parameters_and_latency(tmp_path):
    """A search over student.init's shape: every trial is dense (compression 1x), so the fronts that tell
    the trials apart are perplexity vs parameters and perplexity vs one sequence's CPU latency."""
    from rich.console import Console

    q = rep.quality_for("causal_lm")
    assert q.latency == "latency_ms_b1" and rep.quality_for("classification").latency == "latency_ms_b256"
    assert rep.sizes_differ(SHAPE_ROWS)
    fronts = rep.compute_fronts(SHAPE_ROWS, q)
    # sorted along the front: size down, perplexity up
    assert [r["trial_id"] for r in fronts["perplexity_params"]] == ["s8", "s4", "s2"]
    assert [r["trial_id"] for r in fronts["perplexity_latency"]] == ["s8", "s4", "s2", "s1"]  # s1 is the fastest
    png = rep.plot_size_fronts(SHAPE_ROWS, fronts, tmp_path / "pareto_size.png", quality=q, teacher=17.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    c = Console(record=True, width=140)
    c.print(rep.size_front_table(fronts["perplexity_params"], quality=q, title="front"))
    out = c.export_text()
    assert "num_hidden_layers=2" in out and "655,000" in out and "1.60" in out
    rep.write_trials_csv(SHAPE_ROWS, tmp_path / "trials.csv")
    with open(tmp_path / "trials.csv") as f:
        got = list(csv.DictReader(f))
    assert got[1]["model_params"] == "655000" and got[1]["num_hidden_layers"] == "2"
    rep.write_pareto_json([], tmp_path / "pareto.json", teacher=17.0, baseline=None, quality=q,
                          extra={"fronts": {k: [rep._front_row(r) for r in v] for k, v in fronts.items()}})
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert [p["model_params"] for p in doc["fronts"]["perplexity_params"]] == [2_000_000, 690_000, 655_000]


def test_extra_searched_param_gets_a_column(tmp_path):
    from raydistill.tune.space import short_names

    # a searched key whose leaf is a metric column keeps its full path (no clash with the lr metric)
    name = short_names(["distill.optimizer.lr"], reserved=rep.TRIAL_COLUMNS[5:])["distill.optimizer.lr"]
    assert name == "distill.optimizer.lr"
    rows = [row("t0", 4.0, 0.5, 0.0, 0.8, 1.0, extra={name: 0.003, "divergence": "reverse_kl"})]
    cols = rep.csv_columns(rows)
    assert cols.index("sparsity") < cols.index(name) < cols.index("divergence") < cols.index("accuracy")
    rep.write_trials_csv(rows, tmp_path / "t.csv")
    assert "0.003" in (tmp_path / "t.csv").read_text()


def test_select_best_and_min_sparsity():
    assert rep.select_best(ROWS, "val_accuracy", "max")["trial_id"] == "t1"
    assert rep.select_best(ROWS, "val_accuracy", "max", min_sparsity=0.9)["trial_id"] == "t2"
    assert rep.select_best(ROWS, "val_accuracy", "max", min_sparsity=0.95)["trial_id"] == "t4"
    assert rep.select_best(ROWS, "val_accuracy", "max", min_sparsity=0.99) is None
    assert rep.select_best(ROWS, "val_accuracy", "min")["trial_id"] == "t3"
    assert rep.select_best([], "val_accuracy", "max") is None


def test_best_config_round_trips_through_distill_loader(tmp_path):
    base = Config().model_dump(mode="json")
    base["search"] = {"space": {"distill.alpha": {"dist": "uniform", "low": 0, "high": 1}}}
    best = rep.select_best(ROWS, "val_accuracy", "max", min_sparsity=0.9)
    p = rep.write_best_config(best, base, tmp_path / "best_config.yaml", build=config_from_dict,
                              dump=dump_config, run_name="mnist1d_best")
    cfg = load_config(p)
    assert cfg.search is None
    assert cfg.distill.temperature == 8.0 and cfg.distill.alpha == 0.7 and cfg.compression.sparsity == 0.9
    assert cfg.run.name == "mnist1d_best"
    # everything else is the base config, unchanged
    assert cfg.student == Config().student and cfg.data == Config().data


@pytest.mark.parametrize(
    "kw, k, cpw",
    [
        (dict(cluster_cpus=2, num_workers=1, cpu_per_worker=1, driver_cpu=0.01), 2, 0.99),
        (dict(cluster_cpus=2, num_workers=1, cpu_per_worker=0.5, driver_cpu=0.01), 4, 0.49),
        (dict(cluster_cpus=2, num_workers=4, cpu_per_worker=1, driver_cpu=0.01), 1, 0.4975),
        (dict(cluster_cpus=16, num_workers=2, cpu_per_worker=1, driver_cpu=0.01), 8, 0.995),
        (dict(cluster_cpus=2, num_workers=1, cpu_per_worker=1, driver_cpu=0.01, max_concurrent=1), 1, 1.0),
        (dict(cluster_cpus=2, num_workers=1, cpu_per_worker=1, driver_cpu=0.0), 2, 1.0),
        (dict(cluster_cpus=2, num_workers=1, cpu_per_worker=1, driver_cpu=0.01, max_concurrent=5), 5, 0.39),
    ],
)
def test_resource_plan_always_fits(kw, k, cpw):
    plan = plan_resources(**kw)
    assert plan.max_concurrent == k
    assert plan.cpu_per_worker == pytest.approx(cpw)
    # the planned concurrent trials (drivers + workers) never exceed the cluster
    assert plan.max_concurrent * plan.cpu_per_trial <= kw["cluster_cpus"] + 1e-9
    assert plan.resources_per_worker({"CPU": 7, "memory": 1})["CPU"] == plan.cpu_per_worker


def test_resource_plan_errors():
    with pytest.raises(ValueError, match="trial driver"):
        plan_resources(cluster_cpus=0, num_workers=1, cpu_per_worker=1, driver_cpu=0.01)
    with pytest.raises(ValueError, match="num_workers"):
        plan_resources(cluster_cpus=2, num_workers=0, cpu_per_worker=1, driver_cpu=0.01)


def test_trial_driver_leaves_retries_to_tune(monkeypatch):
    """Each trial's Ray Train run gets max_failures 0 (Tune retries the trial; a Train controller that
    retries after ASHA killed its worker leaks a placement group) and keeps >= 2 checkpoints; the
    searched values reach the trainer, and the base config is not modified."""
    import ray.tune

    from raydistill.tune import search

    base = load_config(None).model_dump(mode="json")
    base["run"]["max_failures"] = 3
    base["run"]["num_to_keep"] = 1
    seen = {}

    class FakeTrainer:
        def fit(self):
            seen["fit"] = True

    class FakeApi:
        def build_student_trainer(self, cfg, teacher, **kw):
            seen.update(cfg=cfg, teacher=teacher, **kw)
            return FakeTrainer()

    class Ctx:
        def get_trial_id(self):
            return "abc_00001"

    monkeypatch.setattr(search, "distill_api", lambda: FakeApi())
    monkeypatch.setattr(ray.tune, "get_context", lambda: Ctx())
    import ray.tune.integration.ray_train as rt

    monkeypatch.setattr(rt, "TuneReportCallback", lambda: "CALLBACK")
    driver = search.make_trial_driver(base, "TEACHER", train_storage="/tmp/x", plan_workers=1,
                                      resources_per_worker={"CPU": 0.99}, build_config=config_from_dict)
    driver({"distill.temperature": 7.5, "compression.sparsity": 0.9})
    cfg = seen["cfg"]
    assert seen["fit"] and seen["teacher"] == "TEACHER" and seen["name"] == "trial_abc_00001"
    assert seen["callbacks"] == ["CALLBACK"]
    assert cfg.run.max_failures == 0 and cfg.run.num_to_keep == 2
    assert cfg.distill.temperature == 7.5 and cfg.compression.sparsity == 0.9
    assert base["run"]["max_failures"] == 3 and base["run"]["num_to_keep"] == 1
