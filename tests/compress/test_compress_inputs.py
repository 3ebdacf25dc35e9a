"""Clear errors for pruning patterns that match nothing and for damaged or crafted sparse checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from raydistill.compress import GradualPruner, compress
from raydistill.compress.checkpoint import FORMAT, load_sparse, save_sparse


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("kw, words", [
    ({"exclude": ["haed"]}, "exclude pattern 'haed' matches no nn.Linear layer"),
    ({"exclude": ["head", "fc9*"]}, "exclude pattern 'fc9*'"),
    ({"include": ["fc*", "fc_typo"]}, "include pattern 'fc_typo'"),
])
def test_pruning_patterns_that_match_no_layer_are_errors(kw, words):
    with pytest.raises(ValueError, match=words.replace("*", r"\*")) as ei:
        GradualPruner(Net(), 0.5, end_step=1, **kw)
    assert "['fc1', 'fc2', 'head']" in str(ei.value)  # says which layers exist
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        compress(Net(), 0.5, **kw)
    # the intended spelling works
    p = GradualPruner(Net(), 0.5, end_step=1, exclude=["head"], include=["fc*", "head"])
    assert sorted(p.layers) == ["fc1", "fc2"]


@pytest.fixture
def sparse_file(tmp_path):
    torch.manual_seed(0)
    m = Net()
    compress(m, 0.5, exclude="head")
    p = tmp_path / "m.safetensors"
    save_sparse(m, p)
    return p


def _with_metadata(src, dst, meta):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def test_load_sparse_round_trip_still_works(sparse_file):
    m = load_sparse(Net, sparse_file)
    assert type(m.fc1).__name__ == "SparseLinear" and isinstance(m.head, nn.Linear)


@pytest.mark.parametrize("case, words", [
    ("directory", "is a directory"),
    ("missing", "no such file"),
    ("not_safetensors", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file"),
    ("bad_json", "'sparse_layers' is not valid JSON"),
    ("no_layers_key", "'sparse_layers' is not valid JSON"),
    ("list_json", "must be a JSON object"),
    ("missing_field", "must be an object with keys"),
    ("bad_nnz", "nnz must be an int >= 0"),
    ("nnz_too_big", "exceeds"),
    ("bias_not_bool", "bias must be true or false"),
])
def test_load_sparse_on_bad_files_raises_value_error_naming_the_file(tmp_path, sparse_file, case, words):
    good = {"in_features": 8, "out_features": 16, "nnz": 64, "bias": True}
    target = {
        "directory": lambda: tmp_path,
        "missing": lambda: tmp_path / "nope.safetensors",
        "not_safetensors": lambda: (tmp_path / "x.safetensors").write_text("hello") and tmp_path / "x.safetensors",
        "truncated": lambda: (tmp_path / "t.safetensors").write_bytes(sparse_file.read_bytes()[:-40])
        and tmp_path / "t.safetensors",
        "bad_json": lambda: _with_metadata(sparse_file, tmp_path / "c.safetensors",
                                           {"format": FORMAT, "sparse_layers": "{nope"}),
        "no_layers_key": lambda: _with_metadata(sparse_file, tmp_path / "c.safetensors", {"format": FORMAT}),
        "list_json": lambda: _with_metadata(sparse_file, tmp_path / "c.safetensors",
                                            {"format": FORMAT, "sparse_layers": "[1, 2]"}),
        "missing_field": lambda: _with_metadata(sparse_file, tmp_path / "c.safetensors",
                                                {"format": FORMAT, "sparse_layers": json.dumps({"fc1": {"nnz": 3}})}),
        "bad_nnz": lambda: _with_metadata(sparse_file, tmp_path / "c.safetensors", {
            "format": FORMAT, "sparse_layers": json.dumps({"fc1": {**good, "nnz": -5}})}),
        "nnz_too_big": lambda: _with_metadata(sparse_file, tmp_path / "c.safetensors", {
            "format": FORMAT, "sparse_layers": json.dumps({"fc1": {**good, "nnz": 10 ** 12}})}),
        "bias_not_bool": lambda: _with_metadata(sparse_file, tmp_path / "c.safetensors", {
            "format": FORMAT, "sparse_layers": json.dumps({"fc1": {**good, "bias": "yes"}})}),
    }[case]()
    exc = FileNotFoundError if case == "missing" else ValueError
    with pytest.raises(exc, match=words) as ei:
        load_sparse(Net, target)
    assert str(target) in str(ei.value) or case in ("directory",) and str(tmp_path) in str(ei.value)


# ---- load_compressed: every problem of a file names the file and the key -------------------------------------

@pytest.fixture
def compressed_file(tmp_path):
    from raydistill.compress import quantize, save_compressed

    torch.manual_seed(0)
    m = Net()
    compress(m, 0.5, include=["fc1"])
    quantize(m, 8, include=["fc2"])
    p = tmp_path / "c.safetensors"
    save_compressed(m, p)
    return p


def _compressed_meta(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_load_compressed_round_trip_still_works(compressed_file):
    from raydistill.compress import QuantizedLinear, load_compressed

    m = load_compressed(Net, compressed_file)
    assert type(m.fc1).__name__ == "SparseLinear" and isinstance(m.fc2, QuantizedLinear)


@pytest.mark.parametrize("case, words", [
    ("directory", "is a directory"),
    ("not_safetensors", "not a readable safetensors file"),
    ("bad_json", "metadata 'quantized_layers' is not valid JSON"),
    ("no_quantized_key", "metadata key 'quantized_layers' is missing"),
    ("entry_not_object", "metadata 'quantized_layers' entry 'fc2' must be an object with keys"),
    ("bits_not_int", "metadata 'quantized_layers' entry 'fc2': bits must be an int >= 0"),
    ("bad_bits", r"metadata 'quantized_layers' entry 'fc2': bits must be one of \(4, 8, 32\)"),
    ("sparse_list", "metadata 'sparse_layers' must be a JSON object, got list"),
    ("deep_structure", "metadata 'structure' is nested too deeply"),
    ("structure_width", "metadata 'structure' entry 'fc1' must be a width"),
    ("wrong_shape", "size mismatch"),
])
def test_load_compressed_on_bad_files_raises_value_error_naming_the_file_and_key(tmp_path, compressed_file, case,
                                                                                words):
    from raydistill.compress import load_compressed

    meta = _compressed_meta(compressed_file)
    q = json.loads(meta["quantized_layers"])

    def with_meta(**kw):
        return _with_metadata(compressed_file, tmp_path / f"{case}.safetensors", {**meta, **kw})

    def wrong_shape():
        from safetensors.torch import load_file, save_file

        t = load_file(str(compressed_file))
        t["fc2.scale"] = torch.ones(3)
        save_file(t, str(tmp_path / "wrong_shape.safetensors"), metadata=meta)
        return tmp_path / "wrong_shape.safetensors"

    target = {
        "directory": lambda: tmp_path,
        "not_safetensors": lambda: (tmp_path / "x.safetensors").write_bytes(b"\x00" * 64) and tmp_path / "x.safetensors",
        "bad_json": lambda: with_meta(quantized_layers="{nope"),
        "no_quantized_key": lambda: _with_metadata(compressed_file, tmp_path / "n.safetensors",
                                                   {k: v for k, v in meta.items() if k != "quantized_layers"}),
        "entry_not_object": lambda: with_meta(quantized_layers=json.dumps({"fc2": [8]})),
        "bits_not_int": lambda: with_meta(quantized_layers=json.dumps({"fc2": {**q["fc2"], "bits": "8"}})),
        "bad_bits": lambda: with_meta(quantized_layers=json.dumps({"fc2": {**q["fc2"], "bits": 5}})),
        "sparse_list": lambda: with_meta(sparse_layers="[1]"),
        "deep_structure": lambda: with_meta(structure="[" * 100_000 + "]" * 100_000),
        "structure_width": lambda: with_meta(structure=json.dumps({"fc1": "wide"})),
        "wrong_shape": wrong_shape,
    }[case]()
    with pytest.raises(ValueError, match=words) as ei:
        load_compressed(Net, target)
    assert str(target) in str(ei.value)


# ---- quantize / prune_structured arguments -------------------------------------------------------------------

@pytest.mark.parametrize("model, kw, words", [
    (nn.Sequential(nn.ReLU(), nn.Tanh()), {}, "quantize: model has no nn.Linear / SparseLinear layer"),
    (Net(), {"exclude": ["*"]}, r"quantize: exclude=\['\*'\] leaves no layer to quantize"),
    (Net(), {"include": ["fc*"], "exclude": ["fc*"]}, "include=.* with exclude=.* leaves no layer"),
])
def test_quantize_with_nothing_to_quantize_is_an_error(model, kw, words):
    from raydistill.compress import quantize

    with pytest.raises(ValueError, match=words) as ei:
        quantize(model, 8, **kw)
    if isinstance(model, Net):
        assert "['fc1', 'fc2', 'head']" in str(ei.value)  # says which layers exist
    assert quantize(Net(), 8, exclude=["head"]).layers  # a selection that leaves layers still works


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 11)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, ids):
        return self.head(self.mlp(self.emb(ids)))


@pytest.mark.parametrize("model, cal, words", [
    (_mlp, lambda: torch.randn(4, 5), r"calibration must be a batch of model inputs: float32 of shape \(batch, 8\)"),
    (_mlp, lambda: torch.randint(0, 3, (4, 8)), "calibration must be .*float32.*got dtype torch.int64"),
    (_mlp, lambda: torch.randn(4, 8, dtype=torch.float64), "got dtype torch.float64"),
    (_TinyLM, lambda: torch.randn(2, 6), r"calibration must be token ids: an integer tensor of shape \(batch, seq\)"),
    (_TinyLM, lambda: torch.randint(0, 11, (12,)), r"got shape \(12,\)"),
    (_TinyLM, lambda: torch.randint(0, 11, (2, 6)) + 11, r"values in \[0, 11\), got values in"),
])
def test_prune_structured_names_a_calibration_of_the_wrong_shape_or_dtype(model, cal, words):
    from raydistill.compress import prune_structured

    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=words):
        prune_structured(m, 0.5, cal())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # nothing pruned
    good = torch.randn(4, 8) if model is _mlp else torch.randint(0, 11, (2, 6))
    assert prune_structured(m, 0.5, good).ranking == "activation"
