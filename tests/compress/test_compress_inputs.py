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
