"""Loss terms and several teachers in the config: what they resolve to, and bad input (an unknown teacher or
layer, a layer map longer than a model, widths that differ with no projection allowed, negative or all-zero
weights, teachers with another tokenizer) failing with rc 2 and the key, before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydistill.config import ConfigError, config_from_dict, dump_config, load_config

from .test_bad_inputs import run_cli  # noqa: F401 - the CLI with Ray replaced by a tripwire

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tune_configs" / "mnist1d_tiny.yaml")
LM_TINY = REPO / "tune_configs" / "lm_tiny.yaml"

# the tiny config's teacher (the first of teachers must equal `teacher`, which the file sets) and a second
TWO = ("teachers={main: {model: cnn1d, kwargs: {channels: 32}, training: {epochs: 15, batch_size: 32, "
       "optimizer: {lr: 0.01}}}, wide: {model: mlp, kwargs: {hidden: 64, depth: 3}}}")


@pytest.mark.parametrize("sets, words", [
    (["distill.terms=[{type: kd_logits, teacher: big}, {type: ce}]"],
     ["distill.terms.0.teacher", "unknown teacher 'big'", "main"]),
    ([TWO, "distill.terms=[{type: kd_logits, teachers: {main: 1, wide: 1, tall: 1}}]"],
     ["distill.terms.0.teachers.tall", "unknown teacher 'tall'", "main, wide"]),
    (["distill.terms=[{type: hidden, layers: [[3, 1]]}]"],
     ["distill.terms.0.layers", "layer 3 of the student does not exist (layers 1..2)"]),
    (["distill.terms=[{type: hidden, layers: [[1, 5]]}]"],
     ["distill.terms.0.layers", "layer 5 of the teacher 'main' does not exist (layers 1..4)"]),
    (["distill.terms=[{type: relation, layers: [[1, 1], [2, 2], [2, 3]]}]"],
     ["distill.terms.0.layers", "3 layer pairs, more than the depth of the student (2)"]),
    (["distill.terms=[{type: hidden, layers: [[1, 1]], projection: false}]"],
     ["distill.terms.0.projection", "student layer 1 is 128 wide", "32"]),
    (["distill.terms=[{type: kd_logits}, {type: ce, weight: -0.5}]"], ["distill.terms.1.weight", "0"]),
    (["distill.terms=[{type: kd_logits, weight: 0}, {type: ce, weight: 0}]"],
     ["distill.terms", "every term's weight is 0"]),
    (["distill.terms=[{type: kd_logits, teachers: {main: 0}}]"], ["distill.terms.0", "every teacher weight is 0"]),
    (["distill.terms=[{type: hidden, layers: [[1, 2, 3]]}]"], ["distill.terms.0.layers", "pairs"]),
    (["distill.terms=[{type: attention}]"], ["distill.terms.0.type", "'kd_logits'"]),
    (["distill.terms=[]"], ["distill", "terms: an empty list"]),
    (["teacher={model: mlp}", TWO], ["teacher: give teacher (one teacher) or teachers (several), not both"]),
    (["distill.teacher_outputs=/nowhere", "distill.terms=[{type: hidden}, {type: kd_logits}]"],
     ["distill.terms.0.teacher", "top-k outputs", "hidden term"]),
    (["scaling.strategy=fsdp", "compression.sparsity=0", "distill.terms=[{type: hidden}]"],
     ["scaling.strategy", "projections"]),
    # an assistant learns with the same terms: its depth counts too
    (["assistants=[{model: mlp, kwargs: {depth: 1}}]", "distill.terms=[{type: hidden, layers: [[2, 2]]}]"],
     ["distill.terms.0.layers", "layer 2 of the student does not exist", "assistants[0]"]),
])
def test_bad_terms_exit_2_naming_the_key(run_cli, sets, words):
    args = [TINY]
    for s in sets:
        args += ["--set", s]
    rc, err = run_cli(*args)
    assert rc == 2, err
    for w in words:
        assert w in err, (w, err)
    assert "TRIPWIRE" not in err and "Traceback" not in err


def test_terms_resolve_and_the_legacy_keys_expand_to_kd_logits_plus_ce(tmp_path):
    cfg = load_config(TINY, ["distill.temperature=3", "distill.alpha=0.8"])
    assert cfg.loss_terms() == [
        {"type": "kd_logits", "weight": 0.8, "teachers": {"main": 1.0}, "combine": "sum", "temperature": 3.0,
         "divergence": "forward_kl", "beta": 0.5, "key": "distill.alpha"},
        {"type": "ce", "weight": pytest.approx(0.2), "key": "distill.alpha"}]
    cfg = load_config(TINY, [TWO, "distill.temperature=3",
                             "distill.terms=[{type: kd_logits, teachers: {main: 2, wide: 1}, combine: mean}, "
                             "{type: ce, weight: 0.3}, {type: hidden, teacher: wide, metric: cosine}, "
                             "{type: relation, weight: 0.1}]"])
    kd, ce, hid, rel = cfg.loss_terms()
    assert kd["teachers"] == {"main": 2.0, "wide": 1.0} and kd["temperature"] == 3.0 and kd["combine"] == "mean"
    assert hid == {"type": "hidden", "weight": 1.0, "teacher": "wide", "layers": "uniform", "metric": "cosine",
                   "projection": True, "key": "distill.terms.2"}
    assert rel["teacher"] == "main" and rel["layers"] == "last"  # the first teacher; the last layers
    assert cfg.teacher == cfg.teachers["main"] and list(cfg.teacher_map()) == ["main", "wide"]
    # the dumped config loads back unchanged (teacher = the first of teachers)
    back = load_config(dump_config(cfg, tmp_path / "c.yaml"))
    assert back == cfg and back.loss_terms() == cfg.loss_terms()
    from raydistill.distill.preflight import check_models

    check_models(cfg)  # these layers and widths exist; projections allowed


def test_teacher_hash_of_the_one_teacher_form_is_unchanged():
    """The cached teacher of a config without `teachers` is found again: its hash ignores the new
    per-teacher `teacher_outputs` and equals that of the same teacher named in `teachers`."""
    from raydistill.config import config_hash, without_scale_defaults
    from raydistill.distill.teachers import teacher_hash

    cfg = load_config(TINY)
    old = config_hash({"teacher": without_scale_defaults({k: v for k, v in cfg.teacher.model_dump(mode="json").items()
                                                          if k not in ("checkpoint", "teacher_outputs")}),
                       "data": cfg.data.model_dump(mode="json", exclude={"materialize"}), "seed": cfg.run.seed})
    assert teacher_hash(cfg) == old
    two = load_config(TINY, [f"teachers={{t: {json.dumps(cfg.teacher.model_dump(mode='json'))}, "
                             "u: {model: mlp}}"])
    assert teacher_hash(two, "t") == old and teacher_hash(two, "u") != old


def _tokenizer(tmp_path, name, text):
    from raydistill.data.text import train_bpe

    return train_bpe(iter([text] * 50), 300, tmp_path / name)


def test_teachers_sharing_no_tokenizer_are_refused_naming_the_teacher(tmp_path):
    tok = _tokenizer(tmp_path, "tok", "def f(x):\n    return x + 1\n")
    llama = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
    base = load_config(LM_TINY, [f"data.tokenizer={tok}"]).model_dump(mode="json")
    n_tok = json.loads((Path(tok) / "tokenizer.json").read_text())["model"]["vocab"]
    # a second teacher whose vocabulary is another tokenizer's (beyond padding)
    bad = dict(base, teachers={"main": base["teacher"], "big": {"model": "hf", "kwargs": {
        "config": dict(llama, vocab_size=len(n_tok) + 5000)}}})
    bad.pop("teacher")
    with pytest.raises(ConfigError, match=r"teachers\.big\.kwargs\.config: vocab_size .* a different tokenizer"):
        config_from_dict(bad)
    # a pretrained teacher directory that comes with its own tokenizer
    other = tmp_path / "other_teacher"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(llama, vocab_size=len(n_tok))))
    (Path(_tokenizer(tmp_path, "tok2", "SELECT * FROM t;\n")) / "tokenizer.json").rename(other / "tokenizer.json")
    bad["teachers"]["big"] = {"model": "hf", "kwargs": {"pretrained": str(other)}}
    with pytest.raises(ConfigError, match=r"teachers\.big\.kwargs\.pretrained .* comes with its own tokenizer"):
        config_from_dict(bad)
