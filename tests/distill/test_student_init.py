"""``student.init: {from: teacher}`` without Ray: the config's rules, the target it resolves to, the
pipeline's pruning step (teacher checkpoint + config -> the saved pruned student and the specs the stages
build) and every bad input as a ConfigError naming its key, before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raydistill.config import ConfigError, load_config

from .test_bad_inputs import run_cli  # noqa: F401 - the CLI with Ray replaced by a tripwire

REPO = Path(__file__).resolve().parents[2]
LM_TINY = str(REPO / "tune_configs" / "lm_tiny.yaml")  # teacher 2 x 64 (4 heads of 16), student 1 x 32 (2 of 16)
VOCAB = 97


def _cfg(*overrides, tmp_path=None):
    extra = [f"run.storage_path={tmp_path}"] if tmp_path is not None else []
    return load_config(LM_TINY, ["student.init.from=teacher", *extra, *overrides])


def _teacher(cfg, seed=0):
    """The config's teacher with random weights far from the near-identity init (every ranking distinct)."""
    from raydistill.models import build_model

    torch.manual_seed(seed)
    net = build_model(cfg.teacher, vocab_size=VOCAB)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


def _calibration(g, n=6, t=32):
    return torch.randint(0, VOCAB, (n, t), generator=g)


# ---- config ----------------------------------------------------------------------------------------


def test_default_is_random_init_and_the_override_round_trips(tmp_path):
    from raydistill.config import dump_config

    assert load_config(LM_TINY).student.init.from_ == "random"
    cfg = _cfg("student.init.hidden_size=0.5", "student.init.depth_ranking=perplexity")
    assert cfg.student.init.from_ == "teacher" and cfg.student.init.shape() == {"hidden_size": 0.5}
    dumped = cfg.model_dump(mode="json")["student"]["init"]
    assert dumped["from"] == "teacher" and "from_" not in dumped  # the YAML key, as a user writes it
    assert load_config(dump_config(cfg, tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize("overrides, words", [
    (["student.init.hidden_size=1.5"], ["student.init.hidden_size", "(0, 1]"]),
    (["student.init.num_hidden_layers=0"], ["student.init.num_hidden_layers", "at least 1"]),
    (["student.init.num_hidden_layers=true"], ["student.init.num_hidden_layers", "boolean"]),
    (["student.init.calibration_blocks=0"], ["student.init.calibration_blocks", "greater than or equal to 1"]),
    (["student.init.params=0.5", "student.init.hidden_size=32"], ["student.init", "params", "not both"]),
    (["student.init.depth_ranking=cosine"], ["student.init.depth_ranking", "block_importance"]),
    (["student.init.form=teacher"], ["student.init.form", "unknown key", "from"]),
    (["compression.structured={ratio: 0.5}"], ["student.init.from", "compression.structured"]),
])
def test_bad_init_config_names_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        _cfg(*overrides)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_shape_without_from_teacher_and_a_non_transformers_teacher_are_errors():
    with pytest.raises(ConfigError, match=r"student.init.hidden_size: a target shape needs from: teacher"):
        load_config(LM_TINY, ["student.init.hidden_size=16"])
    with pytest.raises(ConfigError, match=r"student.init.from: teacher prunes a transformers decoder LM; "
                                          r"teacher.model is 'cnn1d'"):
        load_config(None, ["student.init.from=teacher"])


def test_the_teacher_pruned_is_the_first_of_several_and_errors_name_it():
    from raydistill.config import config_from_dict

    llama = {"model": "hf", "kwargs": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                  "num_hidden_layers": 2, "num_attention_heads": 4}}}
    with pytest.raises(ConfigError, match=r"student.init.from: teacher prunes a transformers decoder LM; "
                                          r"teachers.main.model is 'cnn1d'"):
        config_from_dict({"teachers": {"main": {"model": "cnn1d"}, "big": llama},
                          "student": {"model": "mlp", "init": {"from": "teacher"}}})


def test_loss_terms_are_checked_against_the_student_that_pruning_makes():
    """Before Ray: with ``from: teacher`` the hidden term's layer map is checked against the target shape
    (2 layers here, the student's own config has 1), not against the student's config."""
    from raydistill.distill.preflight import check_models

    terms = "distill.terms=[{type: kd_logits, weight: 0.5}, {type: ce, weight: 0.5}, " \
            "{type: hidden, weight: 0.1, layers: [[2, 2]]}]"
    check_models(_cfg(terms, "student.init.num_hidden_layers=2", "student.init.hidden_size=0.5"))
    with pytest.raises(ConfigError, match=r"distill.terms.2.layers: layer 2 of the student does not exist"):
        check_models(_cfg(terms))  # the default target: the student's own config, 1 layer


# ---- the target ------------------------------------------------------------------------------------


def test_target_is_the_students_own_config_by_default_else_the_shape_or_params():
    from raydistill.compress.prune_shape import config_params
    from raydistill.distill.student_init import check_student_init, init_target, teacher_config

    cfg = _cfg()
    t = teacher_config(cfg)
    target, key, notes = init_target(cfg, t)
    assert target == {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                      "num_attention_heads": 2, "num_key_value_heads": 2} and key == "student.kwargs.config"
    assert notes == []  # the student's heads are the teacher's size (16)
    assert check_student_init(cfg)["head_dim"] == 16
    shape = check_student_init(_cfg("student.init.hidden_size=0.5", "student.init.num_attention_heads=2"))
    assert (shape["num_hidden_layers"], shape["hidden_size"], shape["num_attention_heads"],
            shape["intermediate_size"]) == (2, 32, 2, 128)  # the axes not given keep the teacher's size
    # params: the width for a size at a depth; the count is within 2% of the request
    t_with_vocab = t | {"vocab_size": VOCAB}
    want = config_params(t_with_vocab) // 3
    for layers in (1, 2):
        got, key, _ = init_target(_cfg(f"student.init.params={want}", f"student.init.num_hidden_layers={layers}"),
                                  t_with_vocab)
        assert key == "student.init" and got["num_hidden_layers"] == layers
        assert abs(config_params(t_with_vocab, got) - want) <= 0.03 * want, (layers, got)
        assert got["hidden_size"] % got["num_attention_heads"] == 0
    assert check_student_init(load_config(LM_TINY)) is None  # from: random -- nothing to check


@pytest.mark.parametrize("overrides, words", [
    (["student.init.hidden_size=128"], ["student.init.hidden_size 128 is larger than the model's 64"]),
    (["student.init.num_hidden_layers=3"], ["student.init.num_hidden_layers 3 is larger"]),
    (["student.init.hidden_size=30", "student.init.num_attention_heads=4"],
     ["student.init.num_attention_heads 4 does not divide student.init.hidden_size 30"]),
    (["student.init.num_attention_heads=3", "student.init.num_key_value_heads=2"],
     ["student.init.num_key_value_heads 2 does not divide student.init.num_attention_heads 3"]),
    (["student.init.params=0.0001"], ["student.init.params", "out of reach"]),
    # the default target: the student's own config; a student wider than the teacher names its config key
    (["student.kwargs.config.hidden_size=96", "student.kwargs.config.num_attention_heads=6"],
     ["student.kwargs.config.hidden_size 96 is larger than the model's 64"]),
    (["student.model=mlp", "student.kwargs={}"], ["student.init: give a target shape", "'mlp' has no transformers"]),
    (["teacher.kwargs.config={model_type: gpt_neox, hidden_size: 64, num_hidden_layers: 2, "
      "num_attention_heads: 4, intermediate_size: 128, max_position_embeddings: 64}"],
     ["student.init.from: teacher needs a transformers decoder-only LM", "'gpt_neox'"]),
])
def test_bad_target_is_a_config_error_naming_the_key(overrides, words):
    from raydistill.distill.student_init import check_student_init

    with pytest.raises(ConfigError) as e:
        check_student_init(_cfg(*overrides))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_calibration_smaller_than_asked_names_the_key():
    import numpy as np

    from raydistill.distill.student_init import calibration_from_blocks

    blocks = np.arange(3 * 32, dtype=np.int32).reshape(3, 32) % VOCAB
    with pytest.raises(ConfigError, match=r"student.init.calibration_blocks 5 exceeds the 3 blocks available"):
        calibration_from_blocks(_cfg("student.init.calibration_blocks=5"), blocks)
    a = calibration_from_blocks(_cfg("student.init.calibration_blocks=2", "student.init.seed=1"), blocks)
    b = calibration_from_blocks(_cfg("student.init.calibration_blocks=2", "student.init.seed=1"), blocks)
    assert a.dtype == torch.int64 and a.shape == (2, 32) and torch.equal(a, b)  # seeded: the same blocks
    assert {int(r[0]) for r in a} <= {int(r[0]) for r in torch.from_numpy(blocks)}


# ---- the pipeline's pruning step -----------------------------------------------------------------


def test_prune_teacher_saves_the_pruned_student_and_the_specs_of_the_three_students(tmp_path, seeded):
    from transformers import AutoModelForCausalLM

    from raydistill.compress import make_student_from_teacher
    from raydistill.distill.checkpointing import save_checkpoint_dir
    from raydistill.distill.spec import TeacherArtifact, model_dict
    from raydistill.distill.student_init import student_from_teacher
    from raydistill.models import build_model

    cfg = _cfg("student.init.seed=3", tmp_path=tmp_path)
    teacher = _teacher(cfg)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ck = save_checkpoint_dir(tmp_path / "teacher", model=teacher, meta={"epoch": 1}, state={})
    art = TeacherArtifact(path=str(ck), accuracy=0.0, config_hash="t", model=model_dict(cfg.teacher))
    cal = _calibration(seeded)
    cfg_s, pruned = student_from_teacher(cfg, art, cal, tmp_path / "run" / "pruned_student",
                                         info={"vocab_size": VOCAB, "pad_id": 0})
    out = Path(pruned.path)
    assert out == tmp_path / "run" / "pruned_student" and not out.with_name("pruned_student.tmp").exists()
    conf = json.loads((out / "config.json").read_text())
    assert (conf["num_hidden_layers"], conf["hidden_size"], conf["num_attention_heads"], conf["intermediate_size"],
            conf["head_dim"], conf["vocab_size"]) == (1, 32, 2, 64, 16, VOCAB)
    rep = json.loads((out / "pruning.json").read_text())
    assert rep == pruned.report and rep["shape_after"]["hidden_size"] == 32 and rep["calibration_blocks"] == 6
    assert len(rep["removed_layers"]) == 1 and rep["params_after"] < rep["params_before"]
    from raydistill.compress.structured_lm import lm_nll, perplexity

    for who, net in (("teacher", teacher), ("pruned", None)):
        net = net or AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert rep[f"calibration_perplexity_{who}"] == pytest.approx(
            perplexity(lm_nll(net, cal, pad_id=0, batch_size=4)), rel=1e-5)

    # the student stage builds the pruned weights: the same model the compression API makes from this teacher
    ref, _ = make_student_from_teacher(teacher, cfg.student.kwargs["config"], cal, pad_id=0, seed=3)
    student = build_model(pruned.model, vocab_size=VOCAB).eval()
    assert pruned.model == {"model": "hf", "kwargs": {"pretrained": str(out)}}
    x = torch.randint(0, VOCAB, (2, 16), generator=seeded)
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, ref(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(out))(x).logits, ref(x).logits,
                                   rtol=0, atol=0)
    # the baseline and the random-init student: the same shape, other weights
    assert cfg_s.student.model == "hf" and dict(cfg_s.student.kwargs) == pruned.shape_model["kwargs"]
    assert cfg_s.student.init == cfg.student.init and cfg_s.teacher == cfg.teacher
    rnd = build_model(cfg_s.student, vocab_size=VOCAB)
    assert {k: v.shape for k, v in rnd.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    assert not torch.equal(rnd.model.embed_tokens.weight, student.model.embed_tokens.weight)
    # the teacher is unchanged, and a second call (a resumed run) writes the same student again
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    _, again = student_from_teacher(cfg, art, cal, out, info={"vocab_size": VOCAB, "pad_id": 0})
    assert again.report["removed_layers"] == rep["removed_layers"]
    assert again.report["kept_channels"] == rep["kept_channels"]


def test_student_from_teacher_without_from_teacher_changes_nothing(tmp_path):
    from raydistill.distill.student_init import student_from_teacher

    cfg = load_config(LM_TINY)
    assert student_from_teacher(cfg, None, None, tmp_path / "x", info={}) == (cfg, None)
    assert not (tmp_path / "x").exists()


# ---- CLI: before Ray -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, words", [
    (["student.init.intermediate_size=1000"], ["student.init.intermediate_size 1000 is larger"]),
    (["student.init.hidden_size=30", "student.init.num_attention_heads=4"], ["does not divide"]),
    (["student.init.calibration_blocks=0"], ["student.init.calibration_blocks"]),
])
def test_cli_refuses_a_bad_target_before_ray(run_cli, overrides, words):
    args = [LM_TINY, "--set", "student.init.from=teacher"]
    for o in overrides:
        args += ["--set", o]
    rc, err = run_cli(*args)
    assert rc == 2, err
    for w in words:
        assert w in err, (w, err)
    assert "TRIPWIRE" not in err and "Traceback" not in err


# ---- the report ------------------------------------------------------------------------------------


def test_report_compares_the_three_students_and_the_pruned_one_with_random_init(tmp_path, capsys):
    """build_report with a student made from the teacher: the verdict is of the student distilled from random
    init, ``pruned_vs_random_init`` is the paired change of the pruned student against it (not the sparse
    comparison), and report.md / the terminal label what each student started from."""
    import numpy as np

    from raydistill.distill.cli import _print_summary
    from raydistill.distill.report import build_report, report_markdown
    from raydistill.distill.spec import TeacherArtifact

    rng = np.random.default_rng(0)
    tok = np.full(40, 31.0)
    d = rng.normal(4.0, 0.8, 40)  # per-block NLL per token

    def ev(nll, params=1000):
        return {"perplexity": float(np.exp((nll * tok).sum() / tok.sum())), "eval_tokens": int(tok.sum()),
                "next_token_accuracy": 0.3, "sparsity": 0.0, "compression_ratio": 1.0, "params": params,
                "nonzero_params": params,
                "_items": {"nll": (nll * tok).tolist(), "tokens": tok.tolist(), "teacher_nll": ((d - 1) * tok).tolist()}}

    evals = {"baseline": ev(d), "dense_student": ev(d - 0.05 + rng.normal(0, 0.01, 40)),
             "student": ev(d - 0.3 + rng.normal(0, 0.01, 40))}
    want = evals["student"]["perplexity"] / evals["dense_student"]["perplexity"] - 1
    shape = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
             "head_dim": 16, "intermediate_size": 64}
    si = {"shape_before": shape | {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                   "num_key_value_heads": 4, "intermediate_size": 128},
          "shape_after": shape, "params_after": 1000, "calibration_blocks": 6, "removed_layers": [1],
          "calibration_perplexity_teacher": 20.0, "calibration_perplexity_pruned": 80.0, "notes": []}
    teacher = TeacherArtifact(path=str(tmp_path), accuracy=0.4, config_hash="x", model={"model": "hf"},
                              metrics={"perplexity": 30.0})
    r = build_report(_cfg(), "run", tmp_path, {"main": teacher}, [], evals, False, None, {}, student_init=si)
    assert r["verdict"]["distilled_stage"] == "dense_student" and "sparse_vs_dense" not in r
    assert r["pruned_vs_random_init"]["change"] == pytest.approx(want, rel=1e-9)
    assert r["pruned_vs_random_init"]["ci95"][1] < 0  # 0.3 nats per token better on every block
    assert r["perplexity_vs_baseline"] == pytest.approx(evals["student"]["perplexity"] / evals["baseline"]["perplexity"] - 1)
    r["wall_seconds"] = 1.0
    md = report_markdown(r)
    for text in ("| baseline (from scratch) |", "| dense_student (random init) |", "| student (pruned from the teacher) |",
                 "student (pruned from the teacher, distilled) vs baseline", "2 x 64 pruned to 1 layer x 32",
                 f"pruned from the teacher vs random init, both distilled: perplexity {100 * want:+.1f}%"):
        assert text in md, (text, md)
    _print_summary(r)
    err = " ".join(capsys.readouterr().err.split())
    assert "student (pruned from the teacher)" in err and "pruned from the teacher vs random init" in err
