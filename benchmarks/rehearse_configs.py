"""Every shipped config rehearsed at its real size: `mlkd estimate` of each config in src/mlkd/configs/ (real model,
real scales, proposals and batch; one warm-up and ``--steps`` timed steps per row), gathered into one Markdown
table with the machine: seconds per step and peak memory of each row, the full schedule's time on this machine,
and the disk of each cache.

The demo's configs read a synthetic dataset generated here (their own data path is a demo run folder); the real
ones use the datasets where they are, else their published sizes (said in each config's notes). Each config runs
in a fresh process, so a failure (memory, a dtype) is reported for that config and the others go on.

Run: ``python benchmarks/rehearse_configs.py [--only teacher_voc07 ...] [--steps 1] [--device cpu]
[--results rehearsal.jsonl] [--write docs/benchmarks.md] [--json]``. With ``--results``, each config's result is
appended to that file as it finishes, and a rerun skips the configs already there (the whole rehearsal takes
hours on a small CPU: an interruption loses only the config in progress). With ``--write``, the table replaces the
one between the markers ``<!-- rehearsal -->`` and ``<!-- /rehearsal -->`` of that file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import describe, emit_json, machine
from mlkd.data.synthetic import generate
from mlkd.utils.config import packaged_configs

MARKERS = ("<!-- rehearsal -->", "<!-- /rehearsal -->")


def rehearse(name: str, device: str, steps: int, extra: list[str]) -> dict:
    """``mlkd estimate --json`` of one config in its own process: its result, or its error and time."""
    cmd = [sys.executable, "-m", "mlkd", "estimate", "--config", name, "--device", device, "--steps", str(steps),
           "--json", *[a for s in extra for a in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"config": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
                "took": took}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "took": took}


def table(results: list[dict]) -> str:
    """The Markdown table: one line per measured row, the schedule and caches on each config's first line."""
    lines = ["| config | step | s/step | peak MiB | full schedule here | caches |", "| --- | --- | ---: | ---: | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| `{r['config']}` | failed: {r['error']} | | | | |")
            continue
        for i, row in enumerate(r["rows"]):
            first = i == 0
            lines.append(f"| {'`' + r['config'] + '`' if first else ''} | {row['what']} | {row['seconds']:.2f} | "
                         f"{row['peak_mib']:.0f} | {_schedule(r) if first else ''} | {_caches(r) if first else ''} |")
    return "\n".join(lines)


def _schedule(r: dict) -> str:
    hours = r["schedule"]["seconds"] / 3600
    return f"{r['images']} images: {r['schedule']['steps']} steps, {hours:.1f} h" if hours >= 1 else \
        f"{r['images']} images: {r['schedule']['steps']} steps, {hours * 60:.0f} min"


def _caches(r: dict) -> str:
    c = r["caches"]
    if not c:
        return ""
    parts = [f"proposals {c['proposals_bytes'] / 2**30:.2f} GB"]
    if c.get("features_bytes"):
        parts.append(f"features {c['features_bytes'] / 2**30:.1f} GB ({'fits' if c['features_fit'] else 'on the fly'}"
                     f" at {c['feature_cache_gb']:g} GB)")
    if "soft_targets_bytes" in c:
        parts.append(f"targets {c['soft_targets_bytes'] / 2**20:.1f} MB")
    return "; ".join(parts)


def _finished(path: Path | None) -> dict[str, dict]:
    """The results already in ``path`` (a JSON-lines file), by config name."""
    if path is None or not path.exists():
        return {}
    return {r["config"]: r for r in map(json.loads, path.read_text().splitlines()) if "error" not in r}


def write(path: Path, text: str) -> None:
    """Put ``text`` between the markers of ``path``."""
    doc = path.read_text()
    start, end = doc.index(MARKERS[0]) + len(MARKERS[0]), doc.index(MARKERS[1])
    path.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="these configs (default: every shipped one)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row after one warm-up (1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--results", type=Path, help="a JSON-lines file: each result appended as it finishes; "
                                                        "configs already in it are not run again")
    parser.add_argument("--write", type=Path, help="a Markdown file whose rehearsal markers receive the table")
    parser.add_argument("--json", action="store_true", help="also print every result as one JSON object")
    args = parser.parse_args()
    figures = machine(torch.device(args.device))
    print(describe(figures), flush=True)
    names = args.only or packaged_configs()
    done = _finished(args.results)
    results = [done[name] for name in names if name in done]
    with tempfile.TemporaryDirectory() as tmp:
        synth = None
        for name in names:
            if name in done:
                continue
            extra = []
            if "_demo" in name:  # teacher_demo, teacher_demo_oicr, student_demo_kd, ...: a demo run folder's data
                synth = synth or generate(Path(tmp) / "synth", 600, seed=0, image_size=160, progress=False)["train"]
                extra = [f"data.train={synth}"]
            results.append(rehearse(name, args.device, args.steps, extra))
            r = results[-1]
            print(f"{name}: {'failed: ' + r['error'] if 'error' in r else _schedule(r)} ({r['took']:.0f} s)",
                  flush=True)
            if args.results and "error" not in r:
                with args.results.open("a") as f:
                    f.write(json.dumps(r) + "\n")
    results.sort(key=lambda r: names.index(r["config"]))
    text = f"{describe(figures)[0].upper()}{describe(figures)[1:]}\n\n{table(results)}"
    print("\n" + text)
    if args.write:
        write(args.write, text)
    if args.json:
        emit_json({**figures, "configs": results})


if __name__ == "__main__":
    main()
