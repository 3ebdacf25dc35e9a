"""Real Ray: a run whose newest checkpoint directory was deleted and whose next one is damaged resumes from
the newest intact checkpoint (Ray's snapshot, which lists the deleted directory, is moved aside)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def _epochs(path: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def test_resume_skips_deleted_and_damaged_checkpoints(ray_local, storage, tiny, capsys):
    from ray.train import TrainingFailedError

    from raydistill.distill import build_student_trainer, ensure_teacher
    from raydistill.distill.checkpointing import SNAPSHOT, checkpoint_dirs

    cfg = tiny("distill.epochs=4", "run.debug_crash_at_epoch=4", "run.max_failures=0", "run.num_to_keep=3",
               "distill.transfer_set.size=500")
    teacher = ensure_teacher(tiny(), storage)  # (the crash setting would also crash the teacher's training)
    root = storage / "recover"

    def trainer():
        return build_student_trainer(cfg, teacher, storage_path=root, name="r")

    with pytest.raises(TrainingFailedError):
        trainer().fit()  # a worker dies in epoch 4: checkpoints of epochs 1, 2, 3
    run = root / "r"
    dirs = checkpoint_dirs(run)
    assert [json.loads((d / "meta.json").read_text())["epoch"] for d in dirs] == [3, 2, 1]
    shutil.rmtree(dirs[0])  # epoch 3: deleted by hand (Ray's snapshot still lists it)
    weights = dirs[1] / "model.safetensors"  # epoch 2: truncated
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()

    result = trainer().fit()
    err = capsys.readouterr().err
    assert SNAPSHOT in err and "no longer exist" in err, err
    assert f"checkpoint {dirs[1].name} is damaged" in err and "model.safetensors" in err, err
    assert len(list(run.glob(SNAPSHOT + ".bad-*"))) == 1
    # resumed after epoch 1 (the newest intact checkpoint), not from scratch and not from the damaged one
    assert _epochs(run / "epochs.jsonl") == [1, 2, 3, 2, 3, 4]
    assert json.loads((Path(result.checkpoint.path) / "meta.json").read_text())["epoch"] == 4
