"""`mlkd estimate`: seconds per step, peak memory, the full schedule's time and the caches' disk of a config,
measured at its real sizes before it is launched."""

from __future__ import annotations

import argparse

from mlkd.cli.common import add_device_option, positive_int, resolve_device

DESCRIPTION = """\
Build the config's real model (random weights where its weights file is not here, said so), run real training
steps on synthetic inputs at the config's real sizes (every training scale, its proposals per image, its batch),
and print what a launch needs to know: seconds per step and peak memory per row, the full schedule's time on
this device for the training set's size, and the disk of each cache (proposals, the teacher's soft targets and
region features, and whether those fit distill.feature_cache_gb). A distilling student is measured three ways:
plain (L_p), with the teacher's targets read from caches, and with the teacher run on the fly."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="time and memory of a config at its real sizes, before launching it",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  mlkd estimate --config teacher_voc07\n"
                              "  mlkd estimate --config student_coco_kd --device cuda --world-size 8")
    p.add_argument("--config", required=True, help="a YAML file or the name of a shipped config (teacher_voc07, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--steps", type=positive_int, default=1, help="timed steps per row, after one warm-up (default 1)")
    p.add_argument("--world-size", type=positive_int, default=1,
                   help="processes the run will use (torchrun): the schedule's steps per process (default 1)")
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object instead")
    add_device_option(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from mlkd.training.estimate import estimate, format_estimate

    result = estimate(args.config, resolve_device(args.device), args.steps, args.world_size, tuple(args.set))
    print(json.dumps(result) if args.json else format_estimate(result))
    return 0
