"""The ``mlkd`` command line: a thin layer over library functions.

Each sub-command lives in its own module with a ``register(subparsers)`` that adds its parser and sets
``func``; ``main`` only dispatches.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlkd.cli import data, demo, estimate, export, metrics, predict, proposals, serve, student, teacher
from mlkd.errors import MlkdError
from mlkd.utils.device import keep_freed_memory
from mlkd.version import __version__

COMMANDS = (demo, data, proposals, teacher, student, estimate, predict, serve, metrics, export)

EPILOG = """\
typical flow, step by step (what `mlkd demo` runs; paths as in mlkd's *_demo configs):
  mlkd data synth --out runs/demo/data --num-images 600 --seed 0
  mlkd proposals --dataset runs/demo/data/train.jsonl --method selective_search --max-proposals 200 \\
      --out runs/demo/proposals/train                      # and the same for val.jsonl -> proposals/val
  mlkd train-teacher --config teacher_demo
  mlkd evaluate-teacher --checkpoint runs/demo/seed0/teacher/last.pt --dataset runs/demo/data/val.jsonl \\
      --proposals runs/demo/proposals/val
  mlkd train-student --config student_demo_kd
  mlkd evaluate --checkpoint runs/demo/seed0/student_kd/last.pt --dataset runs/demo/data/val.jsonl
  mlkd export --checkpoint runs/demo/seed0/student_kd/last.pt --format safetensors --out model/

Run `mlkd <command> --help` for the options of each command. Errors in what mlkd is given are one-line
messages; `mlkd --debug <command> ...` shows their traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlkd",
        description="Multi-label image classification by knowledge distillation from weakly-supervised detection.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mlkd {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for module in COMMANDS:
        module.register(sub)
    return parser


class _StdoutHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is when a record arrives (tests and tools replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Library modules log through ``logging`` (``mlkd.*`` loggers); the command line shows their messages."""
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("mlkd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    keep_freed_memory()  # large CPU tensors are reused instead of faulted in again every step
    try:
        return int(args.func(args) or 0)
    except MlkdError as e:  # what the user gave mlkd is refused: say why in one line (bugs keep their traceback)
        if args.debug:
            raise
        print(f"mlkd {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mlkd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
