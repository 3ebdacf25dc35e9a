"""The memory-lean RMSNorm (raydistill.models.norms): transformers' values, float64 gradients, what it
keeps for the backward, and which modules it takes."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from raydistill.models.norms import lean_rms_norms, rms_norm


def _norm(h: int, dtype, seed: int) -> LlamaRMSNorm:
    torch.manual_seed(seed)
    m = LlamaRMSNorm(h, eps=1e-5)
    with torch.no_grad():
        m.weight.copy_(1 + 0.5 * torch.randn(h))
    return m.to(dtype)


def _reference64(x, w, eps):
    x, w = x.double(), w.double()
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_is_transformers_bit_for_bit(dtype):
    hf = _norm(96, dtype, 0)
    lean = copy.deepcopy(hf)
    assert lean_rms_norms(lean) == 1
    x = (3 * torch.randn(4, 7, 96)).to(dtype)
    assert torch.equal(lean(x), hf(x))


def test_gradients_match_float64():
    torch.manual_seed(1)
    x = (2 * torch.randn(3, 5, 64, dtype=torch.float64)).requires_grad_()
    w = (1 + 0.3 * torch.randn(64, dtype=torch.float64)).requires_grad_()
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    g = torch.randn(3, 5, 64, dtype=torch.float64)
    rms_norm(x32, w32, 1e-6).backward(g.float())
    _reference64(x, w, 1e-6).backward(g)
    torch.testing.assert_close(x32.grad.double(), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w32.grad.double(), w.grad, rtol=1e-4, atol=1e-4)


def test_gradcheck_in_float64():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    torch.testing.assert_close(rms_norm(x, w, 1e-6), _reference64(x, w, 1e-6))


def test_low_precision_gradients_as_close_to_float64_as_transformers():
    hf = _norm(128, torch.bfloat16, 3)
    lean = copy.deepcopy(hf)
    lean_rms_norms(lean)
    x = (2 * torch.randn(6, 9, 128)).to(torch.bfloat16)
    g = torch.randn(6, 9, 128).to(torch.bfloat16)
    grads = {}
    for name, m in (("hf", hf), ("lean", lean)):
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        grads[name] = (xi.grad.double(), m.weight.grad.double())
    x64 = x.double().requires_grad_()
    w64 = hf.weight.detach().double().requires_grad_()
    _reference64(x64, w64, hf.variance_epsilon).backward(g.double())
    for i, ref in enumerate((x64.grad, w64.grad)):
        err_hf = (grads["hf"][i] - ref).abs().max()
        err_lean = (grads["lean"][i] - ref).abs().max()
        scale = ref.abs().max()
        assert err_lean <= max(1.5 * err_hf, 1e-2 * scale), (i, float(err_lean), float(err_hf))


def _saved_bytes(module, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_only_the_input_and_one_float_a_row(dtype):
    hf = _norm(256, dtype, 4)
    lean = copy.deepcopy(hf)
    lean_rms_norms(lean)
    x = torch.randn(8, 32, 256).to(dtype).requires_grad_()
    rows = 8 * 32
    lean_bytes, hf_bytes = _saved_bytes(lean, x), _saved_bytes(hf, x)
    assert lean_bytes == x.numel() * x.element_size() + rows * 4
    assert hf_bytes >= 2 * x.numel() * x.element_size()  # what the lean forward saves the backward


def test_a_whole_llama_trains_the_same_and_keeps_its_state_dict():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16)
    torch.manual_seed(5)
    hf = LlamaForCausalLM(cfg)
    lean = copy.deepcopy(hf)
    assert lean_rms_norms(lean) == 2 * 2 + 1  # two a layer and the final one
    assert lean_rms_norms(lean) == 0  # already set
    assert list(lean.state_dict()) == list(hf.state_dict())
    ids = torch.randint(0, 64, (2, 16))
    for m in (hf, lean):
        m(input_ids=ids, labels=ids).loss.backward()
    for (n, a), (_, b) in zip(hf.named_parameters(), lean.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
    copied = copy.deepcopy(lean)  # the compute copy of bf16 training is a deepcopy
    norm = copied.model.norm
    assert norm.forward.__self__ is norm


def test_other_norms_are_left_alone():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    m = torch.nn.Sequential(GemmaRMSNorm(16), torch.nn.LayerNorm(16))
    assert lean_rms_norms(m) == 0
    assert "forward" not in vars(m[0])


def test_rejects_a_weight_of_the_wrong_shape():
    with pytest.raises(ValueError, match="weight must be 1-D"):
        rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)
