"""Orchestration: config -> Ray Train trainers (teacher, assistants, students), evaluation, report.

Public API (imports are lazy: ``import raydistill.distill`` does not import Ray or torch)::

    ray_session(address=None, num_cpus=None)                 # context manager: start/join + shut down Ray
    ensure_teacher(cfg, storage_path) -> TeacherArtifact     # train through Ray Train or load the cache
    ensure_teachers(cfg, storage_path) -> {name: TeacherArtifact}   # every teacher of `teachers`
    build_student_trainer(cfg, teachers, *, storage_path, name, callbacks=None, num_workers=None,
                          resources_per_worker=None) -> ray.train.torch.TorchTrainer
    evaluate_checkpoint(cfg, checkpoint_path) -> dict
    run_distill(cfg, *, storage_path=None, name=None, address=None) -> dict   # the whole job
    export_student(cfg, checkpoint_dir, out_dir) -> Path     # causal LM: save_pretrained + tokenizer
    StageSpec                                                # what train_fn_per_worker gets (typed, frozen)
"""

from __future__ import annotations

from raydistill._lazy import lazy_getattr

_EXPORTS = {
    "ray_session": "raydistill.distill.session",
    "TeacherArtifact": "raydistill.distill.spec",
    "ensure_teacher": "raydistill.distill.teachers",
    "ensure_teachers": "raydistill.distill.teachers",
    "build_student_trainer": "raydistill.distill.stages",
    "build_baseline_trainer": "raydistill.distill.stages",
    "build_teacher_trainer": "raydistill.distill.stages",
    "evaluate_checkpoint": "raydistill.distill.evaluate",
    "run_distill": "raydistill.distill.pipeline",
    "train_fn_per_worker": "raydistill.distill.worker",
    "write_teacher_outputs": "raydistill.distill.teacher_logits",
    "StageSpec": "raydistill.distill.spec",
    "export_student": "raydistill.distill.export",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
