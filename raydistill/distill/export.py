"""Export a causal-LM student for transformers users.

``export_student(cfg, checkpoint_dir, out_dir)`` writes ``save_pretrained`` (safetensors) of the student --
for a pruned student its masked weights, so ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives the
same logits as the trained model -- plus its tokenizer (``PreTrainedTokenizerFast``), and, for a pruned
student, ``sparse_model.safetensors`` beside it: the same model with its pruned layers as ``SparseLinear``
(``raydistill.compress.load_sparse`` reads it). ``out_dir`` is written into a temporary sibling and renamed;
an existing one is replaced only when it is an earlier export (``raydistill.utils.replace_dir_atomically``).
"""

from __future__ import annotations

from pathlib import Path

from raydistill.utils import check_output_dir, replace_dir_atomically

SPARSE_FILE = "sparse_model.safetensors"


def export_student(cfg, checkpoint_dir, out_dir) -> Path:
    from transformers import PreTrainedTokenizerFast

    from raydistill.compress import compress, save_sparse
    from raydistill.data.text import EOS, PAD
    from raydistill.distill.evaluate import load_checkpoint_model

    check_output_dir(out_dir, key="out_dir")  # before any work (a file, a link, someone else's directory)
    net, _, meta, _, info = load_checkpoint_model(cfg, checkpoint_dir, convert=False)
    if not hasattr(net, "save_pretrained"):
        raise ValueError(f"{cfg.student.model!r} is not a transformers model: only model 'hf' students export "
                         "with save_pretrained")
    from raydistill.distill.checkpointing import load_masks

    masks = load_masks(checkpoint_dir)

    def write(tmp: Path) -> None:
        net.save_pretrained(str(tmp), safe_serialization=True)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(info["tokenizer_dir"]) / "tokenizer.json"))
        vocab = tok.get_vocab()
        if EOS in vocab:
            tok.eos_token = EOS
            tok.bos_token = EOS
        if PAD in vocab:
            tok.pad_token = PAD
        tok.save_pretrained(str(tmp))
        if masks:
            compress(net, masks=masks)
            save_sparse(net, tmp / SPARSE_FILE)

    return replace_dir_atomically(out_dir, write, key="out_dir", description="export_student")
