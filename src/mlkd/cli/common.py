"""Options shared by several commands."""

from __future__ import annotations

import argparse
from typing import Any

from mlkd.errors import BadInput


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


def resolve_device(name: str):
    from mlkd.device import pick_device

    return pick_device(name)
