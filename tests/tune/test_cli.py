"""`raydistill tune` argument / config errors: exit code 2, the key named, and Ray never started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY = Path(__file__).parent / "configs" / "tiny_search.yaml"


def _write(tmp_path, mutate) -> Path:
    data = yaml.safe_load(TINY.read_text())
    mutate(data)
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d["search"]["space"].update({"distill.temprature": {"dist": "uniform", "low": 1, "high": 2}}),
         "search.space.distill.temprature: not a config key"),
        (lambda d: d["search"]["space"].update({"distill.alpha": {"dist": "uniform", "low": 1, "high": 0}}),
         "search.space.distill.alpha: empty range"),
        (lambda d: d["search"]["space"].update({"distill.temperature": {"dist": "loguniform", "low": 0, "high": 2}}),
         "search.space.distill.temperature: loguniform needs low > 0"),
        (lambda d: d["search"]["space"].update({"compression.sparsity": {"dist": "choice", "values": []}}),
         "search.space.compression.sparsity: choice needs a non-empty list"),
        (lambda d: d["search"]["space"].update({"distill.alpha": {"dist": "beta", "low": 0, "high": 1}}),
         "search.space.distill.alpha: unknown distribution 'beta'"),
        (lambda d: d.pop("search"), "no 'search' section"),
        (lambda d: d["distill"].update({"temprature": 3}), "distill.temprature"),
        (lambda d: d["search"].update({"metric": "val_perplexity", "mode": "min"}),
         "search.metric: 'val_perplexity' is not reported by a classification task"),
        (lambda d: d["search"].update({"mode": "min"}), "search.mode: val_accuracy is higher-is-better"),
        # loss terms: the weights of a list entry, and the layers a term can draw, are checked before Ray
        (lambda d: d["search"]["space"].update({"distill.terms.1.weight": {"dist": "uniform", "low": 0, "high": 1}}),
         "search.space.distill.terms.1.weight: not a config key (distill.terms is not set"),
        (lambda d: (d["distill"].update({"terms": [{"type": "kd_logits"}, {"type": "hidden"}]}),
                    d["search"]["space"].pop("distill.alpha"),
                    d["search"]["space"].update({"distill.terms.2.weight": {"dist": "uniform", "low": 0, "high": 1}})),
         "search.space.distill.terms.2.weight: not a config key (distill.terms is a list of 2: indices 0..1)"),
        (lambda d: (d["distill"].update({"terms": [{"type": "kd_logits"}, {"type": "ce"}]})),
         "search.space.distill.alpha: distill.terms is set, so distill.alpha weighs nothing"),
        (lambda d: (d["distill"].update({"terms": [{"type": "kd_logits"}, {"type": "hidden"}]}),
                    d["search"]["space"].pop("distill.alpha"),
                    d["search"]["space"].update({"distill.terms.1.layers": {
                        "dist": "choice", "values": ["uniform", [[1, 1]], [[1, 9]]]}})),
         "search.space.distill.terms.1.layers: value [[1, 9]]: distill.terms.1.layers: layer 9 of the teacher"),
        # issue 22: a step budget (ASHA compares epochs), a tracking store that cannot be used
        (lambda d: d["distill"].update({"epochs": None, "max_steps": 50}), "distill.max_steps / distill.max_tokens"),
        (lambda d: d.setdefault("run", {}).update({"tracking": "mlflow", "tracking_uri": "ftp://host/x"}),
         "run.tracking_uri: 'ftp://host/x'"),
        (lambda d: d.setdefault("run", {}).update({"tracking_uri": "somewhere"}), "run.tracking is 'none'"),
    ],
)
def test_bad_config_fails_before_ray(tmp_path, capsys, monkeypatch, mutate, words):
    import ray

    from raydistill.tune.cli import main

    # Whatever other tests left running, the CLI must not get as far as starting (or joining) Ray.
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append((a, k)))
    rc = main([str(_write(tmp_path, mutate)), "--storage-path", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert rc == 2
    assert words in (out.out + out.err), out.out + out.err
    assert not started
    assert not (tmp_path / "runs").exists()


def test_bad_arguments(tmp_path, capsys):
    from raydistill.tune.cli import main

    assert main([str(TINY), "--num-samples", "0", "--storage-path", str(tmp_path)]) == 2
    assert main([str(TINY), "--min-sparsity", "1.5", "--storage-path", str(tmp_path)]) == 2
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert main(["--resume", str(TINY), "--storage-path", str(tmp_path), "--name", "nope"]) == 2
    assert main(["--resume", str(TINY), "--storage-path", str(tmp_path), "--set", "distill.epochs=2"]) == 2
    out = capsys.readouterr().out
    assert "--num-samples must be >= 1" in out and "--min-sparsity must be in [0, 1]" in out
    assert "config file not found" in out and "no search to resume" in out and "--set cannot change" in out


def test_help_and_dispatch(capsys):
    from raydistill.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["tune", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--num-samples", "--max-concurrent", "--storage-path", "--name", "--address", "--set",
                 "--resume", "--min-sparsity"):
        assert flag in out


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["search.mode=max"], "search.mode: val_perplexity is lower-is-better; set min, not max"),
        (["search.metric=val_accuracy", "search.mode=max"],
         "search.metric: 'val_accuracy' is not reported by a causal_lm task"),
        (["search.searcher={type: optuna, objectives: {perplexity: max, sparsity: max}}",
          "search.space={distill.alpha: {dist: uniform, low: 0.5, high: 1.0}}", "search.scheduler={type: fifo}"],
         "search.searcher.objectives.perplexity: perplexity is lower-is-better"),
    ],
)
def test_lm_search_by_name_checks_its_metric_before_ray(tmp_path, capsys, monkeypatch, overrides, words):
    """`raydistill tune lm_search` finds the shipped LM search by name; its metric is a perplexity, which
    only a minimising search may use."""
    import ray

    from raydistill.tune.cli import main

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append((a, k)))
    argv = ["lm_search", "--storage-path", str(tmp_path / "runs")]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert words in out, out
    assert "config file not found" not in out and not started


@pytest.mark.parametrize("space, words", [
    ("{student.init.num_hidden_layers: {dist: grid, values: [2, 8]}}",
     "search.space (student.init.num_hidden_layers=8): student.init.num_hidden_layers 8 is larger than the "
     "model's 4"),
    ("{student.init.params: {dist: grid, values: [0.25, 0.0001]}, "
     "student.init.num_hidden_layers: {dist: grid, values: [1, 4]}}",
     "search.space (student.init.params=0.0001, student.init.num_hidden_layers=1): student.init.params"),
])
def test_shape_search_checks_every_target_against_the_teacher_before_ray(tmp_path, capsys, monkeypatch, space,
                                                                          words):
    """`raydistill tune lm_prune_search`: a searched target shape the teacher cannot be pruned to fails
    before Ray, naming the trial's values and the rule."""
    import ray

    from raydistill.tune.cli import main

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append((a, k)))
    assert main(["lm_prune_search", "--storage-path", str(tmp_path / "runs"), "--set", f"search.space={space}"]) == 2
    out = capsys.readouterr().out
    assert words in out, out
    assert not started and not (tmp_path / "runs").exists()


def test_search_directory_that_is_a_file_a_link_or_someone_elses_is_refused(tmp_path, capsys, monkeypatch):
    import ray

    from raydistill.tune.cli import main

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append((a, k)))
    root = tmp_path / "runs"
    root.mkdir()
    (root / "afile").write_text("mine")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("mine")
    (root / "link").symlink_to(root / "other", target_is_directory=True)
    for name, words in (("afile", "afile is an existing file"), ("link", "link is a symbolic link"),
                        ("other", "other is not empty (notes.txt) and is not an earlier raydistill output")):
        assert main([str(TINY), "--storage-path", str(root), "--name", name]) == 2
        out = capsys.readouterr().out.replace("\n", "")
        assert "--name: " in out and words in out, out
    assert not started
    assert (root / "afile").read_text() == "mine" and (root / "other" / "notes.txt").read_text() == "mine"
