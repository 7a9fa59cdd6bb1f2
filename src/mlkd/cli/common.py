"""Options shared by several commands."""

from __future__ import annotations

import argparse
from typing import Any, Callable, TypeVar

from mlkd.errors import BadInput
from mlkd.utils.checks import PROBABILITY, Rule

T = TypeVar("T", int, float)


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, metavar="SPEC",
                   help="dataset spec, e.g. data/synth/val.jsonl or voc:/data/voc:2007:test (`mlkd data info -h`)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, e.g. difficult=positive; repeatable")


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["difficult=positive", "keep_empty=true"]`` -> ``{"difficult": "positive", "keep_empty": True}``."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--option must be KEY=VALUE (e.g. difficult=positive), got {pair!r}")
        low = value.strip().lower()
        options[key.strip()] = True if low == "true" else False if low == "false" else value
    return options


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = the GPU if there is one, else the CPU")


def add_precision_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"),
                   help="fp32 (default; channels_last on the CPU), bf16 (autocast, only where the hardware has native "
                        "bf16), int8 (CPU, onnxruntime static quantisation; needs mlkd[export]): speed and mAP cost "
                        "of each in docs/benchmarks.md")
    p.add_argument("--calibration", metavar="SPEC",
                   help="int8: training images to calibrate activation ranges on (a dataset spec; default the "
                        "training set recorded in the checkpoint); never the images being evaluated")


def resolve_device(name: str):
    from mlkd.utils.device import pick_device

    return pick_device(name)


# -- numeric options checked where they are parsed: argparse prints "argument --X: expected ..., got '...'" ------
def ranged(convert: Callable[[str], T], ok: Callable[[T], bool], expected: str) -> Callable[[str], T]:
    """An argparse ``type`` that converts with ``convert`` and accepts only values for which ``ok`` holds; anything
    else is a usage error saying what was ``expected`` (e.g. "an integer >= 1") and what was given."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse shows a type's name in some of its own messages
    return parse


def following(rule: Rule) -> Callable[[str], Any]:
    """An argparse ``type`` for the values of ``rule`` (mlkd.utils.checks): the option follows the rule the
    Python API applies to the same argument, and says what it expects in the same words."""
    return ranged(int if rule.integer else float, rule.ok, rule.expected)


positive_int = following(Rule(True, low=1))
non_negative_int = following(Rule(True, low=0))
positive_float = following(Rule(False, low=0, low_open=True))  # finite: "nan" and "inf" parse as floats
non_negative_float = following(Rule(False, low=0))
probability = following(PROBABILITY)
