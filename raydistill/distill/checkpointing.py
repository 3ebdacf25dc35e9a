"""Checkpoint contents that never execute code on load, integrity checks, and recovery of a run directory.

A checkpoint directory (written by the worker, committed by Ray Train) holds::

    model.safetensors        the model's weights
    masks.safetensors        pruning masks (pruned stages only)
    train_state.safetensors  every tensor of the optimizer / scheduler / pruner state
    train_state.json         the rest of that state, with references to those tensors
    meta.json                epoch, stage, config hash, metrics

Nothing is pickled, so loading a checkpoint (even one someone replaced) cannot run code. A directory from
an older raydistill holding ``train_state.pt`` is read with ``torch.load(weights_only=True)``, which
refuses anything but tensors and plain containers.

Recovery (``prepare_run_dir`` in the driver before ``fit()``, ``restore`` in the worker):

* a damaged newest checkpoint (truncated safetensors, bad JSON, missing file): the newest *intact*
  checkpoint is used instead; the skipped one and the reason are printed;
* a checkpoint directory deleted by hand, or a truncated / unreadable ``checkpoint_manager_snapshot.json``
  (Ray Train's list of the run's checkpoints): the snapshot is moved aside (``<name>.bad-<time>``), Ray
  starts a fresh run record and the worker resumes from the newest intact checkpoint directory still on
  disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("raydistill")

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
LEGACY_STATE = "train_state.pt"
MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"
META_FILE = "meta.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"


class CheckpointDamaged(RuntimeError):
    """A checkpoint directory cannot be read back; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------
# train state: nested dicts / lists / tuples of tensors and plain values <-> safetensors + JSON


def _encode(obj: Any, tensors: dict) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"train state: cannot store a {type(obj).__name__} (only tensors, numbers, strings, "
                    f"None and dict/list/tuple of them)")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointDamaged(f"{STATE_JSON} refers to tensor {key!r}, missing from {STATE_TENSORS}")
            return tensors[key]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(k):
    return tuple(k) if isinstance(k, list) else k


def save_train_state(directory, state: dict) -> None:
    """Write ``state`` (optimizer / scheduler / pruner state dicts, counters) as safetensors + JSON."""
    from safetensors.torch import save_file

    d = Path(directory)
    tensors: dict = {}
    tree = _encode(state, tensors)
    save_file(tensors, str(d / STATE_TENSORS))
    (d / STATE_JSON).write_text(json.dumps(tree))


def load_train_state(directory) -> dict:
    """Read what :func:`save_train_state` wrote (or a legacy ``train_state.pt`` with ``weights_only=True``);
    never unpickles code. Raises :class:`CheckpointDamaged` naming the file on any problem."""
    d = Path(directory)
    if (d / STATE_JSON).is_file():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(d / STATE_TENSORS))
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
            raise CheckpointDamaged(f"{d / STATE_TENSORS}: {exc}") from None
        try:
            tree = json.loads((d / STATE_JSON).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointDamaged(f"{d / STATE_JSON}: {exc}") from None
        state = _decode(tree, tensors)
    elif (d / LEGACY_STATE).is_file():
        import pickle

        import torch

        try:
            state = torch.load(d / LEGACY_STATE, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise CheckpointDamaged(f"{d / LEGACY_STATE}: refused or unreadable with weights_only=True "
                                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    else:
        raise CheckpointDamaged(f"{d}: no {STATE_JSON} (nor a legacy {LEGACY_STATE})")
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointDamaged(f"{d}: the train state has no 'epoch'")
    return state


# ----------------------------------------------------------------------------------------------------
# integrity


def read_checkpoint(directory) -> dict:
    """Everything a resume needs from a checkpoint directory, fully read and checked:
    ``{"path", "meta", "weights", "masks", "state"}``. Raises :class:`CheckpointDamaged` (naming the file
    and the problem) for a missing or truncated file or bad JSON."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointDamaged(f"{d}: the checkpoint directory does not exist")
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(f"{d / META_FILE}: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"{d / META_FILE}: not a JSON object")
    out: dict[str, Any] = {"path": d, "meta": meta, "masks": None}
    for key, name, required in (("weights", MODEL_FILE, True), ("masks", MASKS_FILE, False)):
        p = d / name
        if not p.is_file():
            if required:
                raise CheckpointDamaged(f"{p}: missing")
            continue
        try:
            out[key] = load_file(str(p))
        except Exception as exc:  # noqa: BLE001 - SafetensorError on a truncated file
            raise CheckpointDamaged(f"{p}: {exc}") from None
    out["state"] = load_train_state(d)
    return out


def _epoch_of(d: Path) -> tuple:
    """(epochs done, optimizer steps done, mtime): a step checkpoint in the middle of an epoch (issue 22)
    sorts after the previous epoch's and before its own epoch's end."""
    try:
        meta = json.loads((d / META_FILE).read_text())
        ep, step = int(meta.get("epoch", -1)), int(meta.get("global_step") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        ep, step = -1, 0
    try:
        mt = d.stat().st_mtime
    except OSError:
        mt = 0.0
    return ep, step, mt


def checkpoint_dirs(run_dir) -> list[Path]:
    """Ray Train's checkpoint directories in ``run_dir``, newest (highest epoch, then step, then mtime) first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    dirs = [p for p in root.glob("checkpoint_*") if p.is_dir() and ".tmp" not in p.name]
    return sorted(dirs, key=_epoch_of, reverse=True)


def restore(ray_checkpoint_dir, run_dir, *, warn: Callable[[str], None] | None = None) -> dict | None:
    """The checkpoint a worker resumes from: Ray's (``ray.train.get_checkpoint()``, if any) when it is
    intact, else the newest intact one in ``run_dir``; ``None`` for a fresh start. Each damaged
    checkpoint skipped is reported through ``warn`` with the reason."""
    warn = warn or _warn
    cands: list[Path] = []
    if ray_checkpoint_dir is not None:
        cands.append(Path(ray_checkpoint_dir))
    for d in checkpoint_dirs(run_dir):
        if not any(_same(d, c) for c in cands):
            cands.append(d)
    if ray_checkpoint_dir is not None and len(cands) > 1:
        # Ray's checkpoint first; older ones only as fallbacks (never a newer unregistered directory)
        ep = _epoch_of(cands[0])[:2]
        cands = [cands[0]] + [c for c in cands[1:] if _epoch_of(c)[:2] <= ep]
    for i, d in enumerate(cands):
        try:
            ck = read_checkpoint(d)
        except CheckpointDamaged as exc:
            nxt = "trying an older one" if i + 1 < len(cands) else "no intact checkpoint left: starting over"
            warn(f"skipped damaged checkpoint {d}: {exc}; {nxt}")
            continue
        return ck
    return None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _warn(msg: str) -> None:
    log.warning("%s", msg)
    print(f"raydistill: warning: {msg}", file=sys.stderr, flush=True)


def prepare_run_dir(run_dir, *, warn: Callable[[str], None] | None = None) -> list[str]:
    """Before a (re)start of the Ray Train run in ``run_dir``: make Ray's checkpoint-manager snapshot
    usable and say what will be skipped. A snapshot that is not valid JSON, or that lists a checkpoint
    directory that no longer exists, is moved aside (Ray would refuse to start); the worker then resumes
    from the checkpoint directories on disk. Damaged checkpoints are reported (the worker skips them).
    Returns the messages given to ``warn``."""
    warn = warn or _warn
    msgs: list[str] = []

    def say(m):
        msgs.append(m)
        warn(m)

    run = Path(run_dir)
    snap = run / SNAPSHOT
    if snap.is_file():
        problem = None
        try:
            data = json.loads(snap.read_text())
            names = [r.get("checkpoint_dir_name") for r in (data.get("checkpoint_results") or [])]
            latest = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
            missing = [n for n in names + ([latest] if latest else []) if not n or not (run / n).is_dir()]
            if missing:
                problem = f"it lists checkpoint directories that no longer exist: {sorted(set(map(str, missing)))}"
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            problem = f"it is not a valid snapshot ({type(exc).__name__}: {exc})"
        if problem:
            aside = snap.with_name(f"{SNAPSHOT}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(snap, aside)
            say(f"{snap}: {problem}; moved it to {aside.name} and resuming from the checkpoint directories "
                f"still on disk")
    dirs = checkpoint_dirs(run)
    for d in dirs:
        try:
            read_checkpoint(d)
        except CheckpointDamaged as exc:
            say(f"checkpoint {d.name} is damaged and will be skipped ({exc})")
            continue
        break  # the newest intact one is what the worker resumes from
    return msgs


# ----------------------------------------------------------------------------------------------------
# writing and reading a checkpoint directory (the worker writes them; the driver, steps and export read them)


def save_checkpoint_dir(dest: Path, *, model, meta: dict, state: dict | None = None,
                        masks: dict | None = None) -> Path:
    """Write a checkpoint directory atomically: fill ``<dest>.tmp-*`` and rename it to ``dest``."""
    from safetensors.torch import save_file

    import torch

    from raydistill.utils import unwrap_model

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        # clone: tied weights (a transformer's embedding and lm_head) share storage, which safetensors refuses
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap_model(model).state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE))
        if masks:
            save_file({k: v.detach().cpu().to(torch.uint8).contiguous() for k, v in masks.items()},
                      str(tmp / MASKS_FILE))
        if state is not None:
            save_train_state(tmp, state)  # safetensors + JSON: loading never runs code
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def load_weights(model, path) -> dict:
    """Load ``model.safetensors`` (file, or a checkpoint dir holding one) into ``model``; returns meta."""
    from safetensors.torch import load_file

    from raydistill.utils import unwrap_model

    p = Path(path)
    meta: dict = {}
    if p.is_dir():
        if (p / META_FILE).is_file():
            meta = json.loads((p / META_FILE).read_text())
        p = p / MODEL_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no model weights at {p}")
    unwrap_model(model).load_state_dict(load_file(str(p)))
    return meta


def load_masks(path) -> dict | None:
    """The boolean pruning masks of a checkpoint directory, or None when it has none."""
    from safetensors.torch import load_file

    import torch

    p = Path(path) / MASKS_FILE
    if not p.is_file():
        return None
    return {k: v.to(torch.bool) for k, v in load_file(str(p)).items()}
