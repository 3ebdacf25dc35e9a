"""compressed-tensors export (the layout vLLM loads) of a quantized Llama student: the files hold our codes and
scales bit for bit, the library's own decompression (model-free, and transformers' from_pretrained) gives back
our dequantized weights exactly and our logits, and every layer or argument that does not map is an error.

compressed-tensors is a dev dependency (pyproject's `dev` extra): these tests import it, never skip."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from raydistill.compress import QuantizedLinear, export_compressed_tensors, prepare_qat, quantize

warnings.filterwarnings("ignore", category=DeprecationWarning)

VOCAB = 97


def _llama(seed=0, tie=False, attention_bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, use_cache=False,
                      tie_word_embeddings=tie, attention_bias=attention_bias)
    return LlamaForCausalLM(cfg).eval()


def _tokens(g, n=3, t=16):
    return torch.randint(0, VOCAB, (n, t), generator=g)


def _ours(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _file_tensors(d):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _library_dequantized(d, model) -> dict[str, torch.Tensor]:
    """compressed-tensors' model-free decompression of the directory (fp32). It matches tensors by name only,
    so with the int-quantized format (param `weight`) a class target `Linear` would also claim the
    embedding's and the norms' `weight`: those modules are passed as ignored, as its `ignore` argument allows."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    not_linear = [n for n, m in model.named_modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor) and not isinstance(m, nn.Linear)]
    conv = CompressedTensorsDequantizer(str(d), ignore=not_linear, dtype=torch.float32)
    return conv.validate(_file_tensors(d))


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, None), (4, 32)])
def test_round_trip_through_compressed_tensors(tmp_path, seeded, bits, group):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoModelForCausalLM

    model = _llama(attention_bias=True)
    quantize(model, bits=bits, group_size=group, exclude=["lm_head"])
    x = _tokens(seeded)
    with torch.no_grad():
        ref_logits = model(x).logits
    ours = _ours(model)
    assert len(ours) == 14  # 2 layers x (q, k, v, o, gate, up, down)

    rep = export_compressed_tensors(model, tmp_path / "ct")
    d = tmp_path / "ct"
    assert not (tmp_path / "ct.tmp").exists()

    # config.json: what vLLM reads
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized" == rep["format"]
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (grp,) = qc["config_groups"].values()
    assert grp["targets"] == ["Linear"] and grp["input_activations"] is None
    assert grp["weights"] == {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
                              "strategy": "channel" if group is None else "group", "group_size": group}

    # the file: our codes (packed 32 / bits per int32 by the library) and our fp32 scales, bit for bit
    files = _file_tensors(d)
    for name, mod in ours.items():
        assert f"{name}.weight" not in files and f"{name}.weight_zero_point" not in files
        packed = files[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (mod.out_features, mod.in_features * bits // 32)
        assert files[f"{name}.weight_shape"].tolist() == [mod.out_features, mod.in_features]
        codes = unpack_from_int32(packed, bits, torch.Size([mod.out_features, mod.in_features]))
        assert torch.equal(codes, mod.codes())
        scale = files[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32 and torch.equal(scale, mod.scale)
        if mod.bias is not None:  # attention_bias: q/k/v/o have one, the MLP has none
            assert torch.equal(files[f"{name}.bias"], mod.bias)
    assert torch.equal(files["lm_head.weight"], model.lm_head.weight)

    # 1. the library's model-free decompression == codes * scales exactly, into a fresh model
    deq = _library_dequantized(d, model)
    for name, mod in ours.items():
        assert torch.equal(deq[f"{name}.weight"], mod.dequantize()), name
    fresh = _llama(seed=1, attention_bias=True)
    fresh.load_state_dict(deq, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, ref_logits, rtol=1e-5, atol=1e-5)

    # 2. transformers' from_pretrained (compressed-tensors quantizer; decompresses on the first forward)
    back = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    with torch.no_grad():
        back_logits = back(x).logits
    for name, mod in ours.items():
        assert torch.equal(back.get_submodule(name).weight, mod.dequantize()), name
    torch.testing.assert_close(back_logits, ref_logits, rtol=1e-5, atol=1e-5)

    # the exported model is a copy: ours still holds its QuantizedLinear layers
    assert _ours(model).keys() == ours.keys()


def test_w8a8_per_token_activations(tmp_path, seeded):
    """activations='int8' (ours: per tensor, 7-bit) exports as W8A8 with per-token int8 inputs only when asked:
    int-quantized format, int8 `weight` tensors that are our codes, our scales."""
    from transformers import AutoModelForCausalLM

    model = _llama()
    quantize(model, bits=8, activations="int8", exclude=["lm_head"])
    x = _tokens(seeded)
    with torch.no_grad():
        ref_logits = model(x).logits  # fbgemm dynamic int8
    rep = export_compressed_tensors(model, tmp_path / "ct", int8_activations="per_token")
    qc = rep["quantization_config"]
    assert qc["format"] == "int-quantized"
    (grp,) = qc["config_groups"].values()
    assert grp["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                        "strategy": "token", "group_size": None}
    files = _file_tensors(tmp_path / "ct")
    for name, mod in _ours(model).items():
        assert files[f"{name}.weight"].dtype == torch.int8 and torch.equal(files[f"{name}.weight"], mod.qweight)
        assert torch.equal(files[f"{name}.weight_scale"], mod.scale)
    deq = _library_dequantized(tmp_path / "ct", model)
    for name, mod in _ours(model).items():
        assert torch.equal(deq[f"{name}.weight"], mod.dequantize()), name
    # weight_only: the same codes, pack-quantized, no input quantization
    rep = export_compressed_tensors(model, tmp_path / "wo", int8_activations="weight_only")
    (grp,) = rep["quantization_config"]["config_groups"].values()
    assert rep["format"] == "pack-quantized" and grp["input_activations"] is None
    # transformers + compressed-tensors fake-quantize the W8A8 inputs per token (8-bit symmetric): not our
    # per-tensor 7-bit arithmetic, so the logits are not ours; its step max|x_row|/127 is never coarser than
    # ours (max - min)/127, and it stays closer to the float-input logits than ours does
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")).eval()
    float_inputs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "wo")).eval()
    with torch.no_grad():
        per_token, exact_inputs = back(x).logits, float_inputs(x).logits
    assert not torch.equal(per_token, ref_logits)
    assert (per_token - exact_inputs).abs().mean() < (ref_logits - exact_inputs).abs().mean()
    deq = _library_dequantized(tmp_path / "wo", model)
    assert all(torch.equal(deq[f"{n}.weight"], m.dequantize()) for n, m in _ours(model).items())


def test_mixed_schemes_target_layers_by_name(tmp_path, seeded):
    """Two schemes in one model (int4 groups in the MLPs, int8 per channel in attention, lm_head int8):
    one config group per scheme, targeting its layers by name; a warning says vLLM wants lm_head float."""
    from transformers import AutoModelForCausalLM

    model = _llama()
    quantize(model, bits=4, group_size=32, include=["*.mlp.*"])
    quantize(model, bits=8, exclude=["*.mlp.*"])
    x = _tokens(seeded)
    with torch.no_grad():
        ref_logits = model(x).logits
    with pytest.warns(UserWarning, match="lm_head"):
        rep = export_compressed_tensors(model, tmp_path / "ct")
    qc = rep["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == []
    targets = {g["weights"]["num_bits"]: set(g["targets"]) for g in qc["config_groups"].values()}
    assert targets[4] == {n for n in _ours(model) if ".mlp." in n}
    assert targets[8] == {n for n in _ours(model) if ".mlp." not in n} and "lm_head" in targets[8]
    deq = _library_dequantized(tmp_path / "ct", model)
    assert all(torch.equal(deq[f"{n}.weight"], m.dequantize()) for n, m in _ours(model).items())
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_tokenizer_is_written(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    model = _llama()
    quantize(model, bits=8, exclude=["lm_head"])
    export_compressed_tensors(model, tmp_path / "ct", tokenizer=tok)
    assert (tmp_path / "ct" / "tokenizer.json").exists() and (tmp_path / "ct" / "config.json").exists()


# ------------------------------------------------------------------------------------------------------
# bad input: each names the layer or the argument


def test_sparse_layers_are_refused(tmp_path):
    from raydistill.ops.sparse import SparseLinear

    model = _llama()
    quantize(model, bits=8, exclude=["lm_head", "model.layers.0.mlp.up_proj"])
    up = model.model.layers[0].mlp.up_proj
    mask = torch.rand_like(up.weight) > 0.8
    model.model.layers[0].mlp.up_proj = SparseLinear.from_dense(up, mask)
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.mlp\.up_proj' is SparseLinear.*compressed-tensors"):
        export_compressed_tensors(model, tmp_path / "ct")
    model.model.layers[0].mlp.up_proj = SparseLinear.from_dense(up, mask).quantize(bits=8)
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.mlp\.up_proj' is SparseLinearInt8"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists() and not (tmp_path / "ct.tmp").exists()


def test_qat_layers_float_models_and_arguments_are_refused(tmp_path):
    model = _llama()
    prepare_qat(model, bits=8, exclude=["lm_head"])
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.self_attn\.q_proj' is FakeQuantLinear.*quantize"):
        export_compressed_tensors(model, tmp_path / "ct")
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        export_compressed_tensors(_llama(), tmp_path / "ct")
    q = _llama()
    quantize(q, bits=8, activations="int8", exclude=["lm_head"])
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*int8_activations='per_token'"):
        export_compressed_tensors(q, tmp_path / "ct")
    with pytest.raises(ValueError, match="int8_activations must be one of"):
        export_compressed_tensors(q, tmp_path / "ct", int8_activations="tensor")
    seq = nn.Sequential(nn.Linear(8, 8))
    quantize(seq, bits=8)
    with pytest.raises(TypeError, match="not a transformers model"):
        export_compressed_tensors(seq, tmp_path / "ct")
    tied = _llama(tie=True)
    quantize(tied, bits=8)
    with pytest.raises(ValueError, match=r"'lm_head' is quantized but the config ties it"):
        export_compressed_tensors(tied, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_missing_library_is_an_import_error_naming_the_package(tmp_path, monkeypatch):
    model = _llama()
    quantize(model, bits=8, exclude=["lm_head"])
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"compressed-tensors package.*pip install 'compressed-tensors>=0\.20\.1'"):
        export_compressed_tensors(model, tmp_path / "ct")


def test_export_replaces_only_its_own_earlier_export(tmp_path):
    """Nothing of the user's is lost: a directory holding anything else, an existing file or a symbolic link
    is refused before any work (ValueError naming out_dir); an earlier export (its marker) is replaced whole;
    no temporary directory is left beside it, also when the export fails half way."""
    from raydistill.utils import EXPORT_MARKER

    model = _llama()
    quantize(model, bits=8, exclude=["lm_head"])
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"out_dir: .*mine is not empty \(notes.txt\) and is not an earlier"):
        export_compressed_tensors(model, user)
    assert (user / "notes.txt").read_text() == "keep me" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir: .*file is an existing file"):
        export_compressed_tensors(model, tmp_path / "file")
    (tmp_path / "link").symlink_to(user, target_is_directory=True)
    with pytest.raises(ValueError, match="out_dir: .*link is a symbolic link"):
        export_compressed_tensors(model, tmp_path / "link")

    out = tmp_path / "ct"
    export_compressed_tensors(model, out)
    assert (out / EXPORT_MARKER).is_file() and (out / "config.json").is_file()
    (out / "stale.bin").write_bytes(b"0")  # a file from the earlier export goes with it
    export_compressed_tensors(model, out)
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "file", "link", "mine"]  # no temporaries

    class Broken:
        def save_pretrained(self, path):
            (Path(path) / "half.json").write_text("{")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        export_compressed_tensors(model, out, tokenizer=Broken())
    assert (out / "model.safetensors").is_file() and not (out / "half.json").exists()  # the earlier export stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "file", "link", "mine"]
