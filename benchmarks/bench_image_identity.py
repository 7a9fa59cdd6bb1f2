"""What the image file stamps of a proposal cache cost: hashing every image when the cache is built, and the check
of every image when it is attached.

Writes ``--files`` files of ``--size-kb`` random bytes (random bytes: a JPEG's entropy, and no decoder involved)
into a temporary folder, builds a proposal cache with one record of ``--proposals`` boxes per file, and times:

- build: :func:`mlkd.data.base.file_stamp` of every file (one stat + a streamed SHA-256), against reading the
  same bytes without hashing (the I/O floor);
- attach: :func:`mlkd.proposals.attach.check_image_files` (the stamps read from the LMDB, one stat per image),
  against a bare ``os.stat`` of every file; and the same check after every file was touched (mtime moved, bytes
  the same), which hashes them all.

The files were just written, so they are read from the page cache: a cold disk adds its read time to the build
and touched figures (the stat check reads no file data). Run:
``.venv/bin/python benchmarks/bench_image_identity.py [--files 10000] [--size-kb 100] [--repeats 3] [--json]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import describe, emit_json, machine, timed
from mlkd.data.base import ImageRecord, MultiLabelDataset, file_stamp
from mlkd.proposals.attach import check_image_files
from mlkd.proposals.cache import ProposalCache, encode_record, make_meta

CPU = torch.device("cpu")


def make_files(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i:06d}.jpg" for i in range(n)]
    for p in paths:
        p.write_bytes(rng.bytes(size))
    return paths


def read_all(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def build_cache(folder: Path, ds: MultiLabelDataset, proposals: int) -> ProposalCache:
    boxes, scores = np.tile([[0, 0, 9, 9]], (proposals, 1)), np.ones(proposals)
    with ProposalCache.create(folder / "cache", make_meta("bench", {}, ds.identity.to_dict())) as cache:
        for start in range(0, len(ds), 1024):
            cache.put_raw([(r.image_id, encode_record(boxes, scores, file_stamp(r.path)))
                           for r in ds.records[start:start + 1024]])
    return ProposalCache.open(folder / "cache")


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_files(folder, args.files, args.size_kb * 1024)
        records = [ImageRecord(p.name, p, np.ones(1, np.int8)) for p in paths]
        ds = MultiLabelDataset("bench", "all", ["object"], records)
        with build_cache(folder, ds, args.proposals) as cache:
            fig = {"files": args.files, "size_kb": args.size_kb, "proposals": args.proposals,
                   "read_s": timed(lambda: read_all(paths), args.repeats, CPU),
                   "stamp_s": timed(lambda: [file_stamp(p) for p in paths], args.repeats, CPU),
                   "stat_s": timed(lambda: [os.stat(p) for p in paths], args.repeats, CPU),
                   "check_s": timed(lambda: check_image_files(ds, cache), args.repeats, CPU),
                   "stamps_read_s": timed(cache.stamps, args.repeats, CPU)}
            for p in paths:  # a copy without -p: every mtime moves, no byte does
                st = os.stat(p)
                os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            fig["check_touched_s"] = timed(lambda: check_image_files(ds, cache), args.repeats, CPU)
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--size-kb", type=int, default=100)
    p.add_argument("--proposals", type=int, default=500, help="boxes per record (the records' size on disk)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    args = p.parse_args()
    info = machine(CPU)
    print(describe(info))
    fig = run(args)
    gb = fig["files"] * fig["size_kb"] / 2**20
    per = 1e3 / fig["files"]
    print(f"{fig['files']} files of {fig['size_kb']} KB ({gb:.2f} GiB, page cache), {fig['proposals']} boxes/record")
    print(f"build:  stamp (stat + SHA-256) {fig['stamp_s']:.2f} s ({fig['stamp_s'] * per:.3f} ms/image, "
          f"{gb / fig['stamp_s']:.2f} GiB/s); reading the bytes alone {fig['read_s']:.2f} s "
          f"({fig['stamp_s'] / fig['read_s']:.1f}x)")
    print(f"attach: check {fig['check_s']:.3f} s ({fig['check_s'] * per:.4f} ms/image; stamps from the LMDB "
          f"{fig['stamps_read_s']:.3f} s), bare os.stat of every file {fig['stat_s']:.3f} s "
          f"({fig['check_s'] / fig['stat_s']:.1f}x)")
    print(f"attach after touching every file (all hashed): {fig['check_touched_s']:.2f} s "
          f"({fig['check_touched_s'] / fig['check_s']:.0f}x the untouched check)")
    if args.json:
        emit_json({"machine": info, **fig})


if __name__ == "__main__":
    main()
