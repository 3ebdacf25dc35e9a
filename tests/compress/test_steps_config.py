"""compression as an ordered list of steps: parsing (list, steps:, old single-key form), order rules,
dump round trip, searchable keys, recipe checks against the student model, projected bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pathlib import Path

from raydistill.config import ConfigError, config_from_dict, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]


def _steps(cfg):
    return [t for t, _ in cfg.compression.steps()]


def test_old_single_key_form_is_one_prune_step():
    cfg = config_from_dict({"compression": {"sparsity": 0.7, "method": "block"}})
    assert _steps(cfg) == ["prune"]
    assert cfg.compression.sparsity == 0.7 and cfg.compression.quantize is None
    assert _steps(config_from_dict({"compression": {"sparsity": 0.0}})) == []


@pytest.mark.parametrize("form", ["list", "steps"])
def test_list_form(form):
    steps = [{"prune_structured": {"ratio": 0.5, "ranking": "weight_norm"}}, {"prune": {"sparsity": 0.6}},
             {"quantize": {"bits": 4, "group_size": 8, "mode": "ptq"}}]
    cfg = config_from_dict({"compression": steps if form == "list" else {"steps": steps}})
    assert _steps(cfg) == ["prune_structured", "prune", "quantize"]
    c = cfg.compression
    assert c.sparsity == 0.6 and c.structured.ratio == 0.5 and c.structured.ranking == "weight_norm"
    assert (c.quantize.bits, c.quantize.group_size, c.quantize.mode) == (4, 8, "ptq")


def test_list_without_prune_turns_pruning_off_and_round_trips(tmp_path):
    cfg = config_from_dict({"compression": [{"quantize": {"bits": 8}}]})
    assert _steps(cfg) == ["quantize"] and cfg.compression.sparsity == 0.0
    again = load_config(dump_config(cfg, tmp_path / "c.yaml"))
    assert again.model_dump() == cfg.model_dump()


def test_searchable_keys_add_steps():
    cfg = load_config(None, ["compression.quantize.bits=4", "compression.quantize.group_size=8",
                             "compression.structured.ratio=0.25"])
    assert _steps(cfg) == ["prune_structured", "prune", "quantize"]
    assert _steps(load_config(None, ["compression.quantize.bits=32", "compression.structured.ratio=0"])) == ["prune"]


@pytest.mark.parametrize("comp,match", [
    ([{"quantize": {}}, {"prune": {}}], r"compression\[1\]: 'prune' after 'quantize' cannot work"),
    ([{"quantize": {}}, {"prune_structured": {}}], "after 'quantize' cannot work"),
    ([{"prune": {}}, {"prune_structured": {}}], "'prune_structured' after 'prune' cannot work"),
    ([{"prune": {}}, {"prune": {}}], "appears twice"),
    ([{"distil": {}}], "unknown step 'distil'"),
    ([{"prune": {"sparsty": 0.5}}], r"prune: unknown keys \['sparsty'\]"),
    ([{"quantize": {"bits": 16}}], "compression.quantize.bits: must be one of 4, 8 or 32"),
    ([{"quantize": {"activations": "int4"}}], "compression.quantize.activations"),
    ([{"prune_structured": {"ratio": 1.0}}], "compression.structured.ratio"),
    ({"order": ["quantize", "prune"], "quantize": {"bits": 8}}, r"compression.order\[1\]"),
    ([{"quantize": {"mode": "ptq", "start": "dense_student"}}], r"compression.quantize: start 'dense_student' .*mode 'qat'"),
    ([{"quantize": {"epochs": 5}}], r"compression.quantize: epochs sets the QAT fine-tuning of start 'dense_student'"),
    ([{"quantize": {"lr": 1e-3, "start": "scratch"}}], r"compression.quantize: lr sets the QAT fine-tuning"),
    ([{"quantize": {"start": "dense_student", "epochs": 0}}], r"compression.quantize.epochs"),
])
def test_bad_recipes_name_the_key(comp, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"compression": comp})


def test_check_recipe_against_the_student():
    from raydistill.distill.steps import check_recipe

    cfg = config_from_dict({"student": {"model": "mlp", "kwargs": {"hidden": 64}},
                            "compression": [{"quantize": {"bits": 4, "group_size": 32}}]})
    with pytest.raises(ValueError, match=r"compression.quantize.group_size: .*does not divide in_features 40 "
                                         r"\(layer 'net.0'\)"):
        check_recipe(cfg)
    cfg = config_from_dict({"student": {"model": "mlp", "kwargs": {"hidden": 2}},
                            "compression": [{"prune_structured": {"ratio": 0.9}}]})
    with pytest.raises(ValueError, match="compression.structured: .*would remove every unit of layer 'net.0'"):
        check_recipe(cfg)
    check_recipe(config_from_dict({"compression": [{"prune_structured": {"ratio": 0.5}},
                                                   {"quantize": {"bits": 4, "group_size": 8}}]}))


def test_projected_bytes_and_finalize_match(seeded):
    """The worker's projected bytes equal the bytes of the model finalize_student stores (no masks)."""
    from raydistill.distill.steps import finalize_student, projected_nbytes, storage_nbytes

    m = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    for bits, group in ((8, None), (4, 8)):
        net = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
        net.load_state_dict(m.state_dict())
        proj = projected_nbytes(net, None, bits, group)
        rep = finalize_student(net, None, {"bits": bits, "group_size": group, "activations": None})
        assert storage_nbytes(net) == proj == rep["quantize"]["bytes_after"]
    masks = {"0": torch.rand(64, 40, generator=seeded) > 0.8}
    nnz = int(masks["0"].sum())
    # int8 values + the smaller index: 2 bytes per nonzero or a 1-bit row bitmap (64 rows x 5 bytes)
    want = nnz * 1 + min(nnz * 2, 64 * 5) + 65 * 4 + 64 * 4 + 64 * 4 + (10 * 64 + 10 * 4) + 10 * 4
    assert projected_nbytes(m, masks, 8) == want
    net = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    net.load_state_dict(m.state_dict())
    finalize_student(net, masks, {"bits": 8, "group_size": None, "activations": None})
    assert storage_nbytes(net) == want  # what the converted model (SparseLinearInt8, bitmap) holds


def test_evaluate_checkpoint_applies_structure_masks_and_quantize(tmp_path):
    """No Ray: a pruned-shape checkpoint with masks, evaluated as 80%-sparse int8 (the recipe's end)."""
    from raydistill.compress import GradualPruner, prune_structured
    from raydistill.distill.evaluate import evaluate_checkpoint
    from raydistill.distill.worker import save_checkpoint_dir
    from raydistill.models import build_model

    cfg = load_config(REPO / "tune_configs" / "mnist1d_tiny.yaml",
                      [f"run.storage_path={tmp_path}", "data.num_train=200", "data.num_test=100"])
    torch.manual_seed(0)
    net = build_model(cfg.student)
    widths = prune_structured(net, 0.5).widths
    pr = GradualPruner(net, 0.8, begin_step=0, end_step=1, exclude=["net.4"])
    pr.step(1)
    spec = {"model": "mlp", "kwargs": dict(cfg.student.kwargs)}
    ck = save_checkpoint_dir(tmp_path / "ck", model=net, meta={"model": spec, "structure": widths},
                             masks=pr.masks)
    ev = evaluate_checkpoint(cfg, ck, quantize={"bits": 8, "group_size": None, "activations": None, "mode": "qat"},
                             export=str(tmp_path / "student.safetensors"))
    from raydistill.compress import load_compressed

    again = load_compressed(lambda: build_model(cfg.student), ev["export"])
    assert again.net[0].out_features == 64 and type(again.net[0]).__name__ == "SparseLinearInt8"
    assert type(again.net[4]).__name__ == "QuantizedLinear"  # the dense head: int8 dense
    assert ev["structure"] == widths == {"net.0": 64, "net.2": 64}
    assert ev["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert 0 <= ev["accuracy"] <= 1 and 0 <= ev["macro_recall"] <= 1 and ev["latency_ms_b256"] > 0
    x = torch.randn(5, 40)
    from raydistill.distill.evaluate import load_checkpoint_model

    net_float, *_ = load_checkpoint_model(cfg, ck, convert=False)
    with torch.no_grad():
        got, ref = again(x), net_float(x)
    assert torch.allclose(got, ref, atol=0.05 * float(ref.abs().max()))  # the int8 rounding error only
    nnz = [int(pr.masks[k].sum()) for k in ("net.0", "net.2")]
    # int8 SparseLinear: int8 values + a row bitmap (80% sparse: 1 bit per weight is smaller than uint16
    # columns) + int32 row pointers + fp32 row scales + fp32 biases; the dense head int8 with fp32 scales
    # and bias
    want = sum(z + 64 * ((i + 7) // 8) + 65 * 4 + 64 * 4 + 64 * 4 for z, i in zip(nnz, (40, 64))) \
        + (10 * 64 + 10 * 4 + 10 * 4)
    assert all(again.get_submodule(n).index_format == "bitmap" for n in ("net.0", "net.2"))
    assert ev["model_bytes"] == want and "projected_sparse_int8_bytes" not in ev
    assert ev["sparse_layers"] == 2
    assert [r["name"] for r in ev["steps"]["quantize"]["layers"]] == ["net.0", "net.2", "net.4"]
    assert [r["backend"] for r in ev["steps"]["quantize"]["layers"]][:2] == ["int8 SparseLinear"] * 2
    # a scheme without a sparse kernel (int4 groups): pruned layers quantized densely, the CSR size projected
    ev4 = evaluate_checkpoint(cfg, ck, quantize={"bits": 4, "group_size": 8, "activations": None}, latency=False)
    assert ev4["projected_sparse_int8_bytes"] < ev4["model_bytes"] and ev4["sparse_layers"] == 0
    plain = evaluate_checkpoint(cfg, ck, latency=False)
    assert plain["sparse_layers"] == 2 and "latency_ms_b1" not in plain


def test_search_extras_and_worker_side_steps(seeded):
    """Tune trial: bits -> QAT spec, structured ratio -> widths; build_student builds those shapes
    with FakeQuantLinear; final_metrics times a converted copy and leaves the training model alone."""
    import torch

    from raydistill.compress import FakeQuantLinear
    from raydistill.distill.steps import build_student, final_metrics, search_extras, size_metrics
    from raydistill.distill.spec import StageSpec
    from raydistill.tasks import get_task

    cfg = load_config(REPO / "tune_configs" / "mnist1d_compress_search.yaml",
                      ["compression.quantize.bits=4", "compression.structured.ratio=0.75"])
    ex = search_extras(cfg)
    assert ex["structure"] == {"net.0": 128, "net.2": 128} and ex["qat"]["bits"] == 4 and ex["init_from"] is None
    spec = StageSpec(stage="student", task="classification", kind="kd",
                     model={"model": "mlp", "kwargs": dict(cfg.student.kwargs)}, epochs=1, batch_size=8,
                     optimizer={}, lr_schedule={}, seed=0, progress_dir="unused", **ex)
    net = build_student(get_task("classification"), spec.model, {}, structure=spec.structure, qat=spec.qat)
    assert [type(m).__name__ for m in net.net] == ["FakeQuantLinear", "ReLU"] * 2 + ["FakeQuantLinear"]
    assert net.net[0].weight.shape == (128, 40) and net.net[2].weight.shape == (128, 128)
    assert isinstance(net.net[4], FakeQuantLinear) and net.net[4].bits == 4
    sm = size_metrics(net, spec, None)
    assert sm["bits"] == 4 and sm["model_bytes"] == sum(
        (o * i) // 2 + 4 * o + 4 * o for o, i in ((128, 40), (128, 128), (10, 128)))
    fm = final_metrics(net, spec, None, lambda b: torch.randn(b, 40))
    assert fm["latency_ms_b1"] > 0 and fm["latency_ms_b256"] > 0
    assert isinstance(net.net[0], FakeQuantLinear)  # the training model is untouched
    off = search_extras(load_config(REPO / "tune_configs" / "mnist1d_compress_search.yaml"))
    assert off["structure"] is None and off["qat"] is None  # bits 32 and ratio 0: no steps


def test_lm_recipes_quantize_is_classification_only_prune_structured_prunes_heads():
    """A causal-LM config with quantize fails before Ray, naming the key; prune_structured (attention
    heads and gated MLP units) is checked against the student; prune passes."""
    from raydistill.distill.steps import check_recipe

    cfg = load_config(REPO / "tune_configs" / "lm_tiny.yaml", ["compression=[{quantize: {bits: 8}}]"])
    with pytest.raises(ValueError, match=r"compression\.quantize: .*classification"):
        check_recipe(cfg)
    check_recipe(load_config(REPO / "tune_configs" / "lm_tiny.yaml", ["compression=[{prune_structured: {ratio: 0.5}}]"]))
    cfg = load_config(REPO / "tune_configs" / "lm_tiny.yaml", ["compression=[{prune_structured: {ratio: 0.9}}]"])
    with pytest.raises(ValueError, match=r"compression\.structured: .*would remove every head of attention module"):
        check_recipe(cfg)
    cfg = load_config(REPO / "tune_configs" / "lm_tiny.yaml", ["student.kwargs.config.intermediate_size=1",
                                                               "compression=[{prune_structured: {ratio: 0.6}}]"])
    with pytest.raises(ValueError, match=r"compression\.structured: .*ratio 0.6 would remove every unit of gated "
                                         r"MLP 'model.layers.0.mlp' \(1 intermediate units\)"):
        check_recipe(cfg)
    check_recipe(load_config(REPO / "tune_configs" / "lm_tiny.yaml"))  # prune only: fine


def test_structured_init_prunes_an_lm_checkpoint_and_reloads(tmp_path):
    """No Ray: structured_init on a dense Llama student checkpoint (activation ranking on token ids); the
    pruned weights load into a freshly built student resized to the widths, with the same logits."""
    from raydistill.compress import resize_structured
    from raydistill.distill.steps import structured_init
    from raydistill.distill.worker import load_weights, save_checkpoint_dir
    from raydistill.models import build_model

    cfg = load_config(REPO / "tune_configs" / "lm_tiny.yaml", [
        "student.kwargs.config={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: false}",
        "compression=[{prune_structured: {ratio: 0.5, calibration_size: 8}}]"])
    torch.manual_seed(0)
    dense = build_model(cfg.student, vocab_size=97)
    ck = save_checkpoint_dir(tmp_path / "dense", model=dense, meta={"task_info": {"vocab_size": 97}})
    x = torch.randint(0, 97, (20, 16))
    path, widths, rep = structured_init(cfg, ck, tmp_path / "init", x)
    assert rep["ranking"] == "activation"
    assert [r["kv_heads_after"] for r in rep["layers"] if r["kind"] == "attention"] == [1, 1]
    assert [r["units_after"] for r in rep["layers"] if r["kind"] == "gated_mlp"] == [32, 32]
    assert widths == {f"model.layers.{i}.self_attn.{p}": w for i in (0, 1) for p, w in (("q_proj", 16), ("k_proj", 8))} \
        | {f"model.layers.{i}.mlp.gate_proj": 32 for i in (0, 1)}
    fresh = resize_structured(build_model(cfg.student, vocab_size=97), widths)
    load_weights(fresh, path)
    assert fresh.config.num_attention_heads == 2 and fresh.config.num_key_value_heads == 1
    assert fresh.config.intermediate_size == 32
    ref = build_model(cfg.student, vocab_size=97)
    load_weights(ref, ck)
    from raydistill.compress import prune_structured

    prune_structured(ref, 0.5, x[:8])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x[:3]).logits, ref.eval()(x[:3]).logits)
