"""Test helper for the depth / width pruning tests: tiny transformers decoder LMs with random weights
(far from the near-identity of the default init, so that every ranking has distinct scores) and
reference forwards of the unpruned model with layers skipped."""

from __future__ import annotations

from contextlib import contextmanager

import torch

VOCAB = 61


def tiny_lm(kind: str = "llama", *, layers: int = 4, hidden: int = 32, heads: int = 4, kv: int | None = None,
            inter: int = 48, tied: bool = False, bias: bool = False, seed: int = 0, **extra):
    import transformers as tf

    torch.manual_seed(seed)
    kv = heads if kv is None else kv
    common = dict(vocab_size=VOCAB, use_cache=False, tie_word_embeddings=tied)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=32,
                                                bos_token_id=0, eos_token_id=0, **common, **extra))
    llama_like = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=32, **common, **extra)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(attention_bias=bias, mlp_bias=bias, **llama_like))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**llama_like))
    raise ValueError(kind)


def randomize(model, g: torch.Generator, scale: float = 0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def decoder_list(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@contextmanager
def skipped(model, skip):
    """While inside, each decoder layer in ``skip`` returns its input hidden states (the layer is skipped)."""
    def hook(_m, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *out[1:]) if isinstance(out, tuple) else h
    layers = decoder_list(model)
    hooks = [layers[i].register_forward_hook(hook, with_kwargs=True) for i in skip]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _rmsnorm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def rmsnorm_in_float64(monkeypatch):
    """transformers' Llama / Qwen2 / Mistral RMSNorm compute in float32 whatever the model's dtype; the
    equivalences tested in float64 patch them to the same formula in the input dtype, so that they are
    checked to 1e-10 rather than to float32 rounding (which differs between a norm over K channels and one
    over H channels with zeros)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for cls in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm):
        monkeypatch.setattr(cls, "forward", _rmsnorm_in_input_dtype)


def cached_decode(model, x, prefix: int):
    """Logits of ``x`` computed with a KV cache: the first ``prefix`` tokens at once, then one token a step."""
    with torch.no_grad():
        out = model(input_ids=x[:, :prefix], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(prefix, x.shape[1]):
            out = model(input_ids=x[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    return torch.cat(steps, 1)
