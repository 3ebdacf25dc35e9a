"""A model directory never runs its own code: a config.json with ``auto_map`` (custom model classes shipped
as .py files) is refused when the config is loaded, naming the key, and every transformers load passes
``trust_remote_code=False``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from raydistill.config import ConfigError, load_config
from raydistill.models.hf import build_hf

_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 400}


@pytest.fixture
def custom_code_dir(tmp_path):
    d = tmp_path / "teacher"
    d.mkdir()
    sentinel = tmp_path / "RAN"
    (d / "config.json").write_text(json.dumps({**_LLAMA, "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (d / name).write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    return d, sentinel


def test_a_directory_with_auto_map_is_refused_naming_the_key(custom_code_dir):
    d, sentinel = custom_code_dir
    with pytest.raises(ConfigError, match=r"teacher\.kwargs\.pretrained: .*config.json has auto_map \(custom model code"
                                          r".*ships configuration_evil.py, modeling_evil.py.*trust_remote_code=False"):
        load_config("lm_tiny", [f"teacher.kwargs={{pretrained: {d}}}"])
    with pytest.raises(ValueError, match="kwargs.pretrained: .*has auto_map"):
        build_hf({"pretrained": str(d)})
    with pytest.raises(ConfigError, match=r"student\.kwargs\.config: .*has auto_map"):
        load_config("lm_tiny", ["student.kwargs.config.auto_map={AutoModelForCausalLM: x.Y}"])
    assert not sentinel.exists()


def test_every_transformers_load_passes_trust_remote_code_false(tmp_path, monkeypatch):
    import transformers

    seen = []

    def record(kind):
        def fn(*args, **kwargs):
            seen.append((kind, kwargs.get("trust_remote_code", "not passed")))
            return SimpleNamespace(config=SimpleNamespace())
        return fn

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("from_pretrained"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", record("from_config"))
    (tmp_path / "config.json").write_text(json.dumps(_LLAMA))
    build_hf({"pretrained": str(tmp_path)})
    build_hf({"config": dict(_LLAMA)})
    assert seen == [("from_pretrained", False), ("from_config", False)]
