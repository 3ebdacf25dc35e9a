"""Config schema: good and bad files, unknown keys, bad values, overrides, dump round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raydistill.config import (
    Config, ConfigError, apply_overrides, config_from_dict, default_config_path, dump_config, load_config,
)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, data, name="c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_default_config_is_embedded_and_valid():
    cfg = load_config()
    assert default_config_path().name == "mnist1d_default.yaml"
    assert cfg.teacher.model == "cnn1d" and cfg.student.model == "mlp"
    assert cfg.data.num_train == 4000 and cfg.data.num_test == 1000
    assert cfg.compression.sparsity == pytest.approx(0.8)
    assert cfg.distill.transfer_set.size > 0


@pytest.mark.parametrize("path", sorted((REPO / "tune_configs").glob("mnist1d_*.yaml")))
def test_shipped_configs_validate(path):
    load_config(path)


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["distill.temperature=2.5", "assistants=[{model: mlp, kwargs: {hidden: 128}}]",
                             "search={foo: 1}"])
    out = dump_config(cfg, tmp_path / "d.yaml")
    again = load_config(out)
    assert again.model_dump() == cfg.model_dump()
    assert again.distill.temperature == 2.5 and again.assistants[0].kwargs == {"hidden": 128}
    assert again.search == {"foo": 1}


def test_overrides_parse_yaml_and_create_paths():
    d = apply_overrides({"a": {"b": 1}}, ["a.b=2.5", "a.c=[1, 2]", "x.y.z=true", "s=hello"])
    assert d == {"a": {"b": 2.5, "c": [1, 2]}, "x": {"y": {"z": True}}, "s": "hello"}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", "a.=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, [bad])


def test_override_through_scalar_is_an_error():
    with pytest.raises(ConfigError, match="distill.temperature is not a mapping"):
        apply_overrides({"distill": {"temperature": 1.0}}, ["distill.temperature.x=1"])


def test_unknown_key_names_path_and_allowed(tmp_path):
    p = _write(tmp_path, {"distill": {"temprature": 2.0}})
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "distill.temprature" in msg and "unknown key" in msg and "temperature" in msg
    assert str(p) in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)bogus: unknown key; allowed keys here: .*assistants"):
        load_config(_write(tmp_path, {"bogus": 1}))


@pytest.mark.parametrize("override, key, words", [
    ("distill.alpha=1.5", "distill.alpha", "less than or equal to 1"),
    ("distill.divergence=kl", "distill.divergence", "forward_kl"),
    ("compression.sparsity=1.0", "compression.sparsity", "less than 1"),
    ("compression.method=random", "compression.method", "magnitude"),
    ("scaling.num_workers=0", "scaling.num_workers", "greater than or equal to 1"),
    ("distill.epochs=abc", "distill.epochs", "integer"),
    ("student.model=nosuchnet", "student.model", "unknown model 'nosuchnet'"),
    ("run.name=has space", "run.name", "not a valid run name"),
    ("assistants=[{model: mlp, bogus: 1}]", "assistants.0.bogus", "unknown key"),
    ("compression.end_fraction=0.01", "compression", "end_fraction"),  # < begin_fraction (0.05)
])
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    msg = str(ei.value)
    assert f"  {key}" in msg, msg
    assert words in msg, msg
    assert "Traceback" not in msg and "pydantic" not in msg.lower()


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="transfer_set.seed must differ"):
        load_config(None, ["distill.transfer_set.seed=42"])
    with pytest.raises(ConfigError, match="reverse_kl"):
        load_config(None, ["distill.teacher_outputs=/x.parquet", "distill.divergence=reverse_kl"])


def test_import_path_model_and_search_are_accepted():
    cfg = load_config(None, ["student.model=mypkg.models:make_net", "search={space: {temperature: [1, 2]}}"])
    assert cfg.student.model == "mypkg.models:make_net"
    assert cfg.search == {"space": {"temperature": [1, 2]}}


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1, 2", "bad.yaml"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_config_error_is_value_error_and_config_model_dump():
    assert issubclass(ConfigError, ValueError)
    d = Config().model_dump()
    assert set(d) >= {"teacher", "student", "data", "distill", "compression", "scaling", "run", "search",
                      "assistants"}
    assert config_from_dict(d).model_dump() == d
