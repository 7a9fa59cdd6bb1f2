"""The ``mlkd`` command line: a thin layer over library functions.

Each sub-command lives in its own module with a ``register(subparsers)`` that adds its parser and sets
``func``; ``main`` only dispatches.
"""

from __future__ import annotations

import argparse
import sys

from mlkd import __version__
from mlkd.cli import data, demo, export, metrics, proposals, student, teacher

COMMANDS = (demo, data, proposals, teacher, student, metrics, export)

EPILOG = """\
typical flow, step by step (paths as in configs/*_demo.yaml; `mlkd demo` runs it all):
  mlkd data synth --out runs/demo/data --num-images 600 --seed 0
  mlkd proposals --dataset runs/demo/data/train.jsonl --method selective_search --max-proposals 200 \\
      --out runs/demo/proposals/train                      # and the same for val.jsonl -> proposals/val
  mlkd train-teacher --config configs/teacher_demo.yaml
  mlkd evaluate-teacher --checkpoint runs/demo/teacher/last.pt --dataset runs/demo/data/val.jsonl \\
      --proposals runs/demo/proposals/val
  mlkd train-student --config configs/student_demo_kd.yaml
  mlkd evaluate --checkpoint runs/demo/student_kd/last.pt --dataset runs/demo/data/val.jsonl
  mlkd export --checkpoint runs/demo/student_kd/last.pt --format onnx --out export/

Run `mlkd <command> --help` for the options of each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlkd",
        description="Multi-label image classification by knowledge distillation from weakly-supervised detection.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mlkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:  # user-facing errors: no traceback
        print(f"mlkd {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
