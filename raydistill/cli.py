"""The ``raydistill`` command line.

Each subcommand lives in the module that owns it and is imported only when used, so ``raydistill
info`` stays fast and ``raydistill --help`` never starts Ray or builds the extension. A subcommand
module exposes ``main(argv: list[str]) -> int``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("raydistill.info", "versions, op backends (compiled CPU / CUDA / reference), devices"),
    "build-ext": ("raydistill.info:build_ext_main", "build the C++/CUDA extension into the cache now"),
    "bench": ("raydistill.bench", "kernel and pipeline benchmarks: kd-loss, kd-loss-linear, spmm, spmm-int8, distill-throughput"),
    "distill": ("raydistill.distill.cli", "distil (and prune) a student from a teacher with Ray Train"),
    "teacher-logits": ("raydistill.distill.cli:teacher_logits_main",
                       "precompute top-k teacher logits over the transfer set (Ray Data) to parquet"),
    "tune": ("raydistill.tune.cli", "Ray Tune search over temperature/alpha/sparsity + Pareto report"),
}

USAGE = "usage: raydistill <command> [options]\n\ncommands:\n" + "\n".join(
    f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()
) + "\n\nRun `raydistill <command> --help` for a command's options."


def _resolve(target: str):
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn or "main")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from raydistill import __version__

        print(f"raydistill {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"raydistill: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(_resolve(COMMANDS[cmd][0])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
