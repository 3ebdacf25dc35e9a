"""The transformers decoder-LM layout and the calibration pass shared by depth pruning
(:mod:`raydistill.compress.structured_depth`) and width pruning (:mod:`raydistill.compress.structured_width`).

* :func:`decoder_lm` -- the model inside DDP / torch.compile wrappers, checked to be a transformers
  decoder-only causal LM whose ``model_type`` the asked pruning supports;
* :func:`decoder_layers` -- the ``nn.ModuleList`` of decoder layers (``model.layers`` for Llama / Qwen2 /
  Mistral, ``transformer.h`` for GPT-2);
* :func:`check_calibration` -- a calibration set is an integer ``(blocks, seq_len)`` tensor of token ids;
  :func:`calibration_sample` draws one (seeded) from a corpus's packed blocks;
* :func:`calibration_pass` -- one eval forward over the calibration blocks in chunks, with every token
  position's validity (``pad_id`` positions excluded) available to forward hooks; :func:`lm_nll` -- the
  mean next-token negative log-likelihood over the calibration blocks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# model types whose layout the depth / width pruning code knows (tests/compress/test_structured_depth.py and
# test_structured_width.py check each); others are refused rather than pruned into something unknown
DEPTH_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
WIDTH_MODEL_TYPES = ("llama", "mistral", "qwen2")
# config keys holding one entry per decoder layer (indexed like the layers when layers are removed)
PER_LAYER_CONFIG_KEYS = ("layer_types",)


def decoder_lm(model: nn.Module, *, what: str, model_types: tuple[str, ...]) -> nn.Module:
    """The unwrapped transformers decoder-only causal LM inside ``model``; ValueError naming why not."""
    from raydistill.utils import unwrap_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers causal LM (an nn.Module), got {type(model).__name__}")
    base = unwrap_model(model)
    conf = getattr(base, "config", None)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of the LM task
        PreTrainedModel = ()
    if not isinstance(base, PreTrainedModel) or conf is None or not callable(getattr(base, "get_output_embeddings",
                                                                                      None)):
        raise ValueError(f"model: {what} needs a transformers decoder-only causal LM (e.g. LlamaForCausalLM), got "
                         f"{type(base).__name__}")
    if getattr(conf, "is_encoder_decoder", False) or base.get_output_embeddings() is None:
        raise ValueError(f"model: {what} needs a transformers decoder-only causal LM with an lm_head, got "
                         f"{type(base).__name__} (model_type {conf.model_type!r})")
    if conf.model_type not in model_types:
        raise ValueError(f"model: {what} supports model_type {', '.join(model_types)}; {type(base).__name__} has "
                         f"model_type {conf.model_type!r}, whose layer layout is not known to it")
    return base


def decoder_layers(base: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, layers): the one ``nn.ModuleList`` of ``config.num_hidden_layers`` decoder layers."""
    n = int(base.config.num_hidden_layers)
    found = [(parent, name, child) for parent in base.modules() for name, child in parent.named_children()
             if isinstance(child, nn.ModuleList) and len(child) == n]
    if len(found) != 1:
        raise ValueError(f"model: found {len(found)} module lists of num_hidden_layers={n} layers in "
                         f"{type(base).__name__}; expected exactly one (the decoder layers)")
    return found[0]


def model_configs(base: nn.Module) -> list:
    """The distinct config objects of the model and its submodules (usually one shared object)."""
    out = {}
    for m in base.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "to_dict"):
            out.setdefault(id(c), c)
    return list(out.values())


def check_calibration(calibration, base: nn.Module, *, name: str = "calibration") -> Tensor:
    """``calibration``: an integer tensor ``(blocks, seq_len)`` of token ids of ``base``'s vocabulary, with at
    least one block of at least 2 tokens (one next-token target) and ``seq_len`` within the model's
    positions. Returns it; TypeError / ValueError naming ``name`` and the rule otherwise."""
    if not isinstance(calibration, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids (blocks, seq_len), got "
                        f"{type(calibration).__name__}")
    if calibration.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must hold integer token ids (int64 or int32), got dtype {calibration.dtype}")
    if calibration.dim() != 2:
        raise ValueError(f"{name} must be 2-D (blocks, seq_len) token ids, got shape {tuple(calibration.shape)}")
    if calibration.shape[0] < 1 or calibration.shape[1] < 2:
        raise ValueError(f"{name} of shape {tuple(calibration.shape)} is smaller than one block: it needs at least "
                         "one block of at least 2 tokens")
    vocab = int(base.get_output_embeddings().weight.shape[0])
    lo, hi = int(calibration.min()), int(calibration.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} holds token ids in [{lo}, {hi}], outside the model's vocabulary [0, {vocab})")
    conf = base.config
    mp = getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None)
    if isinstance(mp, int) and calibration.shape[1] > mp:
        raise ValueError(f"{name} blocks of {calibration.shape[1]} tokens exceed the model's {mp} positions")
    return calibration


def calibration_sample(blocks, n: int, *, seed: int = 0, key: str = "calibration_blocks") -> Tensor:
    """``n`` blocks drawn without replacement (seeded) from ``blocks``, a ``(N, seq_len)`` array or tensor
    of token ids (e.g. the packed training blocks), as an int64 tensor. ValueError naming ``key`` when ``n``
    is below one block or above ``N``."""
    blocks = torch.as_tensor(blocks)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{key} must be at least one block (an int >= 1), got {n!r}")
    if blocks.dim() != 2 or n > blocks.shape[0]:
        raise ValueError(f"{key} {n} exceeds the {blocks.shape[0] if blocks.dim() == 2 else 0} blocks available")
    g = torch.Generator().manual_seed(int(seed))
    return blocks[torch.randperm(blocks.shape[0], generator=g)[:n]].long()


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (calibration blocks per forward), got {batch_size!r}")
    return batch_size


class CalibrationState:
    """What forward hooks see during :func:`calibration_pass`: ``valid``, the ``(b, seq_len)`` bool mask of
    the current chunk's positions that count (not ``pad_id``)."""

    valid: Tensor | None = None

    def rows(self, x: Tensor) -> Tensor:
        """The valid token rows ``(n, features)`` of a ``(b, seq_len, features)`` activation."""
        return x.reshape(-1, x.shape[-1])[self.valid.reshape(-1).to(x.device)]


def _chunks(calibration: Tensor, batch_size: int):
    for i in range(0, calibration.shape[0], batch_size):
        yield calibration[i:i + batch_size]


@contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def calibration_pass(base: nn.Module, calibration: Tensor, state: CalibrationState, *, pad_id: int | None,
                     batch_size: int, nll: bool = False) -> tuple[float, int]:
    """Run ``base`` (eval mode, no KV cache) over ``calibration`` in chunks of ``batch_size`` blocks, setting
    ``state.valid`` before each chunk. With ``nll``: returns (summed next-token NLL, number of targets) over
    targets that are not ``pad_id``; else (0.0, 0)."""
    dev = next(base.parameters()).device
    total, count = 0.0, 0
    with _eval(base):
        for ids in _chunks(calibration, batch_size):
            ids = ids.to(dev).long()
            state.valid = ids != pad_id if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
            out = base(input_ids=ids, use_cache=False)
            if nll:
                logits = out.logits[:, :-1].double()
                tgt = ids[:, 1:]
                keep = state.valid[:, 1:]
                lp = torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]
                total += float(-(lp[keep]).sum())
                count += int(keep.sum())
    state.valid = None
    return total, count


def lm_nll(base: nn.Module, calibration: Tensor, *, pad_id: int | None, batch_size: int) -> float:
    """Mean next-token negative log-likelihood (nats; perplexity = exp) of ``base`` on ``calibration``."""
    total, count = calibration_pass(base, calibration, CalibrationState(), pad_id=pad_id, batch_size=batch_size,
                                    nll=True)
    if count == 0:
        raise ValueError("calibration has no next-token target that is not pad_id")
    return total / count


def perplexity(nll: float) -> float:
    return math.exp(min(nll, 50.0))


def rebuild_check(base: nn.Module, what: str) -> None:
    """The pruned model's config must rebuild exactly its parameter shapes (what ``from_pretrained`` does);
    RuntimeError otherwise (a bug: the config edit missed something)."""
    with torch.device("meta"):
        fresh = type(base)._from_config(base.config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[:5]
        raise RuntimeError(f"{what}: the pruned {type(base).__name__}'s config does not rebuild its shapes "
                           f"(first differences: {[(k, have.get(k), want.get(k)) for k in diff]})")
