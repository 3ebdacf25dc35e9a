"""A student made by pruning a teacher (layers, hidden size, heads, MLP units: its config then holds a
``head_dim`` other than ``hidden_size / heads``) exports like any other student: ``save_pretrained`` /
``from_pretrained`` give back the same logits bit for bit, and quantized it goes through compressed-tensors
(the layout vLLM loads) and transformers' own loader gives back our quantized model's logits.

compressed-tensors is a dev dependency (pyproject's `dev` extra): imported, never skipped."""

from __future__ import annotations

import json
import warnings

import torch

from raydistill.compress import export_compressed_tensors, make_student_from_teacher, quantize

from _lm_models import VOCAB, randomize, tiny_lm

warnings.filterwarnings("ignore", category=DeprecationWarning)

TARGET = {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 20}


def _pruned(g):
    teacher = randomize(tiny_lm("llama", layers=4, hidden=32, heads=4, kv=2, inter=48), g).eval()
    calibration = torch.randint(0, VOCAB, (4, 16), generator=g)
    student, rep = make_student_from_teacher(teacher, TARGET, calibration)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.head_dim) == (2, 24, 2, 1, 20, 8) and len(rep.removed_layers) == 2
    return student.eval()


def test_pruned_student_round_trips_through_save_pretrained(tmp_path, seeded):
    from transformers import AutoModelForCausalLM

    student = _pruned(seeded)
    student.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["head_dim"] == 8 and conf["hidden_size"] == 24  # head_dim written: 24 / 2 heads would be 12
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randint(0, VOCAB, (3, 16), generator=seeded)
    with torch.no_grad():
        assert torch.equal(back(x).logits, student(x).logits)


def test_pruned_student_exports_through_compressed_tensors(tmp_path, seeded):
    from transformers import AutoModelForCausalLM

    student = _pruned(seeded)
    quantize(student, bits=8, exclude=["lm_head"])
    x = torch.randint(0, VOCAB, (3, 16), generator=seeded)
    with torch.no_grad():
        ours = student(x).logits
    rep = export_compressed_tensors(student, tmp_path / "ct")
    assert len(rep["layers"]) == 2 * 7  # q, k, v, o, gate, up, down of the 2 kept layers
    conf = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert conf["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (conf["num_hidden_layers"], conf["hidden_size"], conf["head_dim"]) == (2, 24, 8)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours, rtol=1e-5, atol=1e-5)
