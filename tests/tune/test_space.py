"""The search section: schema errors and config-key checks name the key, before Ray starts."""

from __future__ import annotations

import pytest

from raydistill.config import Config, config_from_dict
from raydistill.tune.space import (
    SearchSpaceError,
    apply_trial_config,
    check_space_against_config,
    check_space_combinations,
    grid_size,
    parse_search,
    short_names,
    to_tune_param_space,
)

GOOD = {
    "space": {
        "distill.temperature": {"dist": "loguniform", "low": 1.0, "high": 20.0},
        "distill.alpha": {"dist": "uniform", "low": 0.0, "high": 1.0},
        "compression.sparsity": {"dist": "choice", "values": [0.0, 0.5, 0.9]},
    },
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
}


def _base() -> dict:
    return Config().model_dump(mode="json")


def _check(raw: dict) -> None:
    check_space_against_config(parse_search(raw), _base(), config_from_dict)


def _space(key: str, dim: dict, **extra) -> dict:
    return {"space": {key: dim}, **extra}


def test_good_space_parses_and_converts():
    spec = parse_search(GOOD)
    check_space_against_config(spec, _base(), config_from_dict)
    ps = to_tune_param_space(spec)
    assert set(ps) == set(GOOD["space"])
    from ray.tune.search.sample import Categorical, Float

    assert isinstance(ps["distill.temperature"], Float)
    assert isinstance(ps["compression.sparsity"], Categorical)
    assert spec.metric == "val_accuracy" and spec.mode == "max" and not spec.multi_objective
    # sampled values stay inside their ranges
    t = ps["distill.temperature"].sample(size=200)
    assert min(t) >= 1.0 and max(t) <= 20.0


@pytest.mark.parametrize(
    "raw, key, words",
    [
        (_space("distill.temprature", {"dist": "uniform", "low": 1, "high": 2}), "search.space.distill.temprature",
         "not a config key"),
        (_space("distil.temperature", {"dist": "uniform", "low": 1, "high": 2}), "search.space.distil.temperature",
         "not a config key"),
        (_space("distill", {"dist": "uniform", "low": 1, "high": 2}), "search.space.distill", "section"),
        (_space("distill.alpha", {"dist": "uniform", "low": 0.5, "high": 0.5}), "search.space.distill.alpha",
         "empty range"),
        (_space("distill.alpha", {"dist": "uniform", "low": 0.9, "high": 0.1}), "search.space.distill.alpha",
         "empty range"),
        (_space("distill.temperature", {"dist": "loguniform", "low": 0.0, "high": 5}),
         "search.space.distill.temperature", "low > 0"),
        (_space("distill.temperature", {"dist": "loguniform", "low": -1.0, "high": 5}),
         "search.space.distill.temperature", "low > 0"),
        (_space("distill.temperature", {"dist": "gaussian", "low": 1, "high": 5}),
         "search.space.distill.temperature", "unknown distribution"),
        (_space("distill.temperature", {"low": 1, "high": 5}), "search.space.distill.temperature", "dist"),
        (_space("compression.sparsity", {"dist": "choice", "values": []}), "search.space.compression.sparsity",
         "non-empty"),
        (_space("distill.divergence", {"dist": "choice", "values": ["forward_kl", "l2"]}),
         "search.space.distill.divergence", "'l2'"),
        (_space("compression.sparsity", {"dist": "uniform", "low": 0.0, "high": 1.5}),
         "search.space.compression.sparsity", "1.5"),
        (_space("distill.epochs", {"dist": "uniform", "low": 1, "high": 3}), "search.space.distill.epochs", "epochs"),
        (_space("distill.alpha", {"dist": "quniform", "low": 0, "high": 1}), "search.space.distill.alpha", "q"),
        (_space("distill.alpha", {"dist": "uniform", "low": 0, "high": 1, "step": 3}),
         "search.space.distill.alpha.step", "Extra"),
        (_space("search.metric", {"dist": "choice", "values": ["a"]}), "search.space.search.metric", "search"),
        (_space("distill.alpha", {"dist": "uniform", "low": 0, "high": 1}, searcher={"type": "grid"}),
         "distill.alpha", "grid"),
        (_space("distill.alpha", {"dist": "grid", "values": [0.1]}, searcher={"type": "optuna"}),
         "distill.alpha", "optuna"),
        (_space("distill.alpha", {"dist": "uniform", "low": 0, "high": 1}, scheduler={"type": "hyperband"}),
         "search.scheduler.type", "asha"),
        (_space("distill.alpha", {"dist": "uniform", "low": 0, "high": 1}, num_samples=0),
         "search.num_samples", "greater than or equal to 1"),
        (_space("distill.alpha", {"dist": "uniform", "low": 0, "high": 1}, searcher={"type": "random",
                                                                                   "objectives": {"accuracy": "max"}}),
         "search.searcher", "optuna"),
        ({"space": {}}, "search", "at least one"),
        ({"metric": "val_accuracy"}, "search.space", "missing"),
        ({"space": {"distill.alpha": [0.1, 0.2]}}, "search.space.distill.alpha", "mapping"),
    ],
)
def test_bad_space_names_the_key(raw, key, words):
    with pytest.raises(SearchSpaceError) as ei:
        _check(raw)
    msg = str(ei.value)
    assert key in msg, msg
    assert words.lower() in msg.lower(), msg


def test_missing_search_section():
    with pytest.raises(SearchSpaceError, match="no 'search' section"):
        parse_search(None)


def test_randint_and_choice_types_checked_against_config():
    # an int key accepts a randint range; a float range would be rejected for it
    _check(_space("distill.epochs", {"dist": "randint", "low": 1, "high": 4}))
    _check(_space("distill.divergence", {"dist": "choice", "values": ["forward_kl", "reverse_kl"]}))
    _check(_space("distill.optimizer.lr", {"dist": "loguniform", "low": 1e-4, "high": 1e-2}))


def test_grid_searcher_enumerates_choices():
    spec = parse_search({"space": {"distill.alpha": {"dist": "choice", "values": [0.1, 0.5]},
                                   "compression.sparsity": {"dist": "grid", "values": [0.0, 0.5, 0.9]}},
                         "searcher": {"type": "grid"}})
    ps = to_tune_param_space(spec)
    assert ps["distill.alpha"] == {"grid_search": [0.1, 0.5]}
    assert grid_size(spec) == 6


def test_optuna_multi_objective_spec():
    spec = parse_search({**GOOD, "searcher": {"type": "optuna", "objectives": {"accuracy": "max",
                                                                              "sparsity": "max"}}})
    assert spec.multi_objective and spec.objectives == {"accuracy": "max", "sparsity": "max"}
    from raydistill.tune.search import make_searcher

    s = make_searcher(spec)
    assert s.metric == ["accuracy", "sparsity"] and s.mode == ["max", "max"]


def test_apply_trial_config_and_short_names():
    base = _base()
    out = apply_trial_config(base, {"distill.temperature": 7.5, "compression.sparsity": 0.9})
    assert out["distill"]["temperature"] == 7.5 and out["compression"]["sparsity"] == 0.9
    assert base["distill"]["temperature"] != 7.5 or base is not out  # base untouched (deep copy)
    assert config_from_dict(out).distill.temperature == 7.5
    assert short_names(["distill.temperature", "distill.optimizer.lr"]) == {
        "distill.temperature": "temperature", "distill.optimizer.lr": "lr"}
    assert short_names(["distill.epochs", "teacher.training.epochs"]) == {
        "distill.epochs": "distill.epochs", "teacher.training.epochs": "teacher.training.epochs"}
    with pytest.raises(SearchSpaceError, match="nope"):
        apply_trial_config(base, {"distill.nope": 1})


def test_grouped_asha_compares_trials_only_within_their_group():
    from types import SimpleNamespace

    from raydistill.tune.search import make_scheduler

    spec = parse_search({**GOOD, "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2,
                                               "group_by": "compression.sparsity"}})
    sched = make_scheduler(spec, epochs=4)

    def trial(i, s):
        return SimpleNamespace(trial_id=f"t{i}", config={"compression.sparsity": s})

    dense = [trial(i, 0.0) for i in range(3)]
    sparse = [trial(10 + i, 0.9) for i in range(3)]
    for t in dense + sparse:
        sched.on_trial_add(None, t)
    # dense trials set a high bar at epoch 1; sparse ones are worse than every dense one
    acts = [sched.on_trial_result(None, t, {"epoch": 1, "val_accuracy": a}) for t, a in zip(dense, (0.8, 0.9, 0.5))]
    assert acts[-1] == "STOP"  # worse than its own group's median
    acts = [sched.on_trial_result(None, t, {"epoch": 1, "val_accuracy": a}) for t, a in zip(sparse, (0.4, 0.45, 0.3))]
    assert acts[:2] == ["CONTINUE", "CONTINUE"] and acts[2] == "STOP"  # judged against sparse trials only
    # plain ASHA would have stopped the sparse ones for losing to the dense ones
    plain = make_scheduler(parse_search(GOOD), epochs=4)
    for t in dense + sparse:
        plain.on_trial_add(None, t)
    for t, a in zip(dense, (0.8, 0.9, 0.5)):
        plain.on_trial_result(None, t, {"epoch": 1, "val_accuracy": a})
    assert plain.on_trial_result(None, sparse[1], {"epoch": 1, "val_accuracy": 0.45}) == "STOP"


@pytest.mark.parametrize("sched, words", [
    ({"type": "asha", "group_by": "distill.alpha"}, "choice/grid"),
    ({"type": "asha", "group_by": "distill.epochs"}, "not a searched key"),
    ({"type": "fifo", "group_by": "compression.sparsity"}, "only applies to scheduler asha"),
])
def test_group_by_validation(sched, words):
    with pytest.raises(SearchSpaceError, match=words):
        parse_search({**GOOD, "scheduler": sched})


def test_every_combination_of_a_shape_search_is_checked_against_the_teacher():
    """student.init keys searched together: a combination that cannot be pruned from the teacher (heads
    not dividing the hidden size) fails before Ray, naming the combination and the rule; a good grid passes."""
    from raydistill.config import load_config
    from raydistill.distill.student_init import check_student_init

    cfg = load_config("lm_tiny", ["student.init.from=teacher"])
    base = cfg.model_dump(mode="json")
    good = parse_search({"space": {"student.init.num_hidden_layers": {"dist": "grid", "values": [1, 2]},
                                   "student.init.hidden_size": {"dist": "grid", "values": [32, 64]}}})
    check_space_against_config(good, base, config_from_dict)
    assert check_space_combinations(good, base, config_from_dict, check_student_init, "student.init.") == 4
    bad = parse_search({"space": {"student.init.hidden_size": {"dist": "grid", "values": [32, 30]},
                                  "student.init.num_attention_heads": {"dist": "choice", "values": [2, 4]}}})
    check_space_against_config(bad, base, config_from_dict)  # each value alone is a valid config value
    with pytest.raises(SearchSpaceError, match=r"search.space \(student.init.hidden_size=30, "
                                               r"student.init.num_attention_heads=4\): student.init."
                                               r"num_attention_heads 4 does not divide student.init.hidden_size 30"):
        check_space_combinations(bad, base, config_from_dict, check_student_init, "student.init.")
    assert check_space_combinations(bad, base, config_from_dict, check_student_init, "nothing.") == 0


def test_loss_term_weights_layers_and_teacher_weights_are_searchable_by_path():
    """``distill.terms.<i>.<key>`` addresses a list entry: its weight, its layer map (a choice of lists) and a
    kd_logits term's teacher weights are checked against the config and written into a trial's config."""
    base = config_from_dict({
        "teachers": {"main": {"model": "cnn1d"}, "second": {"model": "mlp"}},
        "distill": {"terms": [{"type": "kd_logits", "teachers": {"main": 1.0, "second": 0.5}},
                              {"type": "ce", "weight": 0.5}, {"type": "hidden", "weight": 0.1}]}}).model_dump(mode="json")
    raw = {"space": {"distill.terms.0.teachers.second": {"dist": "uniform", "low": 0.0, "high": 2.0},
                     "distill.terms.1.weight": {"dist": "uniform", "low": 0.0, "high": 1.0},
                     "distill.terms.2.layers": {"dist": "choice", "values": ["uniform", "last", [[2, 4]]]}}}
    spec = parse_search(raw)
    check_space_against_config(spec, base, config_from_dict)
    cfg = config_from_dict(apply_trial_config(base, {"distill.terms.1.weight": 0.25,
                                                     "distill.terms.2.layers": [[2, 4]],
                                                     "distill.terms.0.teachers.second": 1.5}))
    kd, ce, hid = cfg.loss_terms()
    assert ce["weight"] == 0.25 and hid["layers"] == [[2, 4]] and kd["teachers"] == {"main": 1.0, "second": 1.5}
    assert base["distill"]["terms"][1]["weight"] == 0.5  # the base is not modified
    assert short_names(list(raw["space"])) == {"distill.terms.0.teachers.second": "second",
                                               "distill.terms.1.weight": "weight", "distill.terms.2.layers": "layers"}
    bad = parse_search({"space": {"distill.terms.1.weight": {"dist": "uniform", "low": -1.0, "high": 1.0}}})
    with pytest.raises(SearchSpaceError, match=r"search.space.distill.terms.1.weight: value -1.0 is not valid"):
        check_space_against_config(bad, base, config_from_dict)
    bad = parse_search({"space": {"distill.terms.2.layers": {"dist": "choice", "values": ["middle"]}}})
    with pytest.raises(SearchSpaceError, match=r"search.space.distill.terms.2.layers: value 'middle'"):
        check_space_against_config(bad, base, config_from_dict)



def test_set_path_refuses_a_key_the_config_does_not_have():
    from raydistill.tune.space import _set_path

    base = config_from_dict({"distill": {"terms": [{"type": "kd_logits"}, {"type": "ce", "weight": 0.5}]}}
                            ).model_dump(mode="json")
    assert _set_path(base, "distill.terms.1.weight", 0.25)["distill"]["terms"][1]["weight"] == 0.25
    for missing in ("distill.nope", "distill.terms.2.weight", "distill.terms.x.weight", "nope.weight"):
        with pytest.raises(SearchSpaceError, match=f"search.space.{missing}: not a config key"):
            _set_path(base, missing, 1.0)  # was: written under the key None (or a TypeError)
