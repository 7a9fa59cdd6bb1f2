"""Caches that never crash or lie: proposal caches whose images changed on disk, truncated and damaged LMDB
files (in child processes: a bus error must not take pytest down), a file-size limit while writing, and
teacher targets files that cannot be trusted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mlkd.cli import main
from mlkd.data import CustomDataset, MultiLabelDataset
from mlkd.data.base import ImageRecord
from mlkd.data.synthetic import generate
from mlkd.errors import BadFile, BadInput
from mlkd.proposals import ProposalCache, generate_proposals, make_meta
from mlkd.proposals.attach import open_split
from mlkd.utils.distributed import DistInfo

SS = {"mode": "fast", "max_proposals": 20}


@pytest.fixture
def built(tmp_path):
    """A small synthetic dataset and a proposal cache generated for its training split."""
    manifests = generate(tmp_path / "synth", 6, seed=2, image_size=64, val_fraction=0.34, progress=False)
    ds = CustomDataset(manifests["train"])
    generate_proposals(ds, "selective_search", SS, tmp_path / "cache", progress=False)
    return manifests["train"], tmp_path / "cache", ds


def _rewrite_rotated(path: Path, same_size: bool) -> None:
    """Replace an image in place by itself rotated 180 degrees (what an editor's 'rotate' does); with
    ``same_size`` the new PNG is padded after its end to the old file's size, which decoders ignore."""
    old = path.read_bytes()
    ok, png = cv2.imencode(".png", cv2.rotate(cv2.imread(str(path)), cv2.ROTATE_180), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    data = png.tobytes()
    if same_size:
        assert len(data) <= len(old)
        data += bytes(len(old) - len(data))
    path.write_bytes(data)
    assert cv2.imread(str(path)) is not None


@pytest.mark.parametrize("same_size", [True, False])
def test_an_image_changed_in_place_is_refused_at_attach_naming_it(built, same_size):
    """The cache's proposals were computed from the old pixels: evaluate-teacher and a distillation run used to
    go on with them. Same file name (and size) is not the same image."""
    train, cache, ds = built
    changed = ds.records[1]
    _rewrite_rotated(changed.path, same_size)
    with pytest.raises(BadInput) as e:
        open_split(str(train), proposals=str(cache))
    msg = str(e.value)
    assert f"proposal cache {cache}" in msg and "changed on disk" in msg and changed.image_id in msg
    assert ds.records[0].image_id not in msg and "mlkd proposals" in msg and "--method selective_search" in msg


def test_evaluate_teacher_refuses_a_cache_whose_image_changed(trained, tmp_path, capsys):
    """What a user saw: `mlkd evaluate-teacher` exited 0 on proposals of the old pixels."""
    data = shutil.copytree(trained.data.val.parent, tmp_path / "data")  # copy2 keeps the mtimes
    cache = shutil.copytree(trained.data.val_proposals, tmp_path / "cache")
    args = ["evaluate-teacher", "--checkpoint", str(trained.teacher), "--dataset", str(data / trained.data.val.name),
            "--proposals", str(cache), "--quiet", "--device", "cpu", "--workers", "0"]
    assert main(args) == 0
    val = CustomDataset(data / trained.data.val.name)
    _rewrite_rotated(val.records[0].path, same_size=False)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"proposal cache {cache} was computed from other image files: 1 of the {len(val)} images" in err
    assert val.records[0].image_id in err


def test_touched_images_with_the_same_content_are_accepted(built):
    train, cache, ds = built
    for r in ds.records:  # a copy without -p, a `touch`: every mtime moves, no byte does
        st = os.stat(r.path)
        os.utime(r.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert open_split(str(train), proposals=str(cache)).proposals is not None


def test_a_cache_of_other_images_with_the_same_file_names_is_refused_at_attach(built, tmp_path):
    """Another folder with the same file names (an earlier export, another seed): the ids and names agree, the
    images do not. It used to fail late, on a proposal outside its image, blaming a damaged cache."""
    train, cache, ds = built
    other = generate(tmp_path / "other", 6, seed=7, image_size=64, val_fraction=0.34, progress=False)["train"]
    assert CustomDataset(other).identity.images_hash == ds.identity.images_hash
    assert main(["proposals", "info", "--cache", str(cache), "--dataset", str(other)]) == 1
    with pytest.raises(BadInput, match=rf"(?s){len(ds)} of the {len(ds)} images of custom/train changed on disk"):
        open_split(str(other), proposals=str(cache))


def test_a_cache_without_image_records_works_as_before(built, tmp_path):
    """Caches written before the per-image records (record version 1, meta version 2) cannot see an in-place
    change; they are read and attached exactly as before."""
    train, _, ds = built
    meta = {**make_meta("test", {}, ds.identity.to_dict()), "version": 2}
    with ProposalCache.create(tmp_path / "old", meta) as cache:
        cache.put_many((r.image_id, np.ones((1, 4)) * [0, 0, 9, 9], np.ones(1)) for r in ds.records)
    _rewrite_rotated(ds.records[0].path, same_size=False)
    split = open_split(str(train), proposals=str(tmp_path / "old"))
    assert split.proposals.meta["version"] == 2 and split[0][1]["proposals"].shape == (1, 4)


# -- truncated and damaged LMDB files: run in a child, where a bus error would show as exit -7 / 135 ----------------
def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "mlkd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _page_size(data: Path) -> int:
    return int.from_bytes(data.read_bytes()[40:44], sys.byteorder)  # LMDB's meta page 0 holds it


def _truncate(data: Path, cut: str) -> None:
    size = {"empty": 0, "one page": _page_size(data), "meta pages only": 2 * _page_size(data),
            "half": data.stat().st_size // 2}[cut]
    assert size < data.stat().st_size
    os.truncate(data, size)


CUTS = ["empty", "one page", "meta pages only", "half"]


@pytest.mark.parametrize("cut", CUTS)
def test_a_truncated_proposal_cache_is_a_bad_file_naming_it_not_a_bus_error(built, cut):
    train, cache, _ = built
    _truncate(cache / "data.mdb", cut)
    proc = _run("proposals", "info", "--cache", str(cache), "--dataset", str(train))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith(f"mlkd proposals: error: proposal cache {cache} is damaged: ")
    assert "build it again with `mlkd proposals --dataset SPEC --method selective_search" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(BadFile, match="is damaged"):  # the same check, in this process, before anything is mapped
        ProposalCache.open(cache)


def _feature_store(root: Path) -> None:
    from mlkd.distill import feature_store
    feature_store.clear(root)
    rng = np.random.default_rng(0)
    views = [(f"img{i}", flip, np.arange(40), {"fc7": rng.random((40, 256)).astype(np.float16)})
             for i in range(12) for flip in (False, True)]
    feature_store.write_shard(root / "shard0", {"fc7": 256}, views, len(views), progress=False)
    feature_store.finish(root, {"run": 1}, ["shard0"])


READ_STORE = ("import sys\nfrom pathlib import Path\nfrom mlkd.distill.feature_store import TeacherFeatures\n"
              "with TeacherFeatures(Path(sys.argv[1]), {'fc7': 256}) as store:\n"
              "    for i in range(12):\n        store.get(f'img{i}', False), store.get(f'img{i}', True)\n")


@pytest.mark.parametrize("cut", CUTS)
def test_a_truncated_teacher_feature_store_is_a_bad_file_and_is_rebuilt(tmp_path, cut, caplog):
    from mlkd.distill import feature_store
    root = tmp_path / "teacher_features"
    _feature_store(root)
    assert _run(str(root), code=READ_STORE).returncode == 0
    assert feature_store.is_current(root, {"run": 1})
    _truncate(root / "shard0" / "data.mdb", cut)
    proc = _run(str(root), code=READ_STORE)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # it was -7 (SIGBUS) for "half"
    assert f"mlkd.errors.BadFile: teacher feature store shard {root / 'shard0'} is damaged" in proc.stderr
    assert f"remove {root}" in proc.stderr and "computes it again" in proc.stderr
    assert not feature_store.is_current(root, {"run": 1})  # so a resumed run rebuilds it
    assert "is damaged" in caplog.text and "computed again" in caplog.text


def test_a_malformed_feature_record_is_a_bad_file_naming_the_record(tmp_path):
    from mlkd.distill.feature_store import TeacherFeatures
    root = tmp_path / "teacher_features"
    _feature_store(root)
    with TeacherFeatures(root, {"fc7": 128}) as store:  # read with other widths than it was written with
        with pytest.raises(BadFile, match=r"malformed record 'img3' \(flip 1\) in teacher feature store shard .*"
                                          r"shard0: 20644 bytes for 40 regions .*remove .*teacher_features"):
            store.get("img3", True)


def _flip_in_file(data: Path, needle: bytes, at: int, value: int = 0xFF) -> None:
    raw = bytearray(data.read_bytes())
    start = raw.find(needle)
    assert start >= 0
    raw[start + at] = value
    data.write_bytes(bytes(raw))


def test_a_record_key_that_is_not_utf8_is_a_bad_file_naming_it(built):
    _, cache, ds = built
    _flip_in_file(cache / "data.mdb", ds.records[0].image_id.encode(), 2)
    with ProposalCache.open(cache) as c, pytest.raises(BadFile, match=r"proposal cache .* is damaged: record key "
                                                                      r"b'im\\xffges/train/000000.png' is not UTF-8 "
                                                                      r"text .*build it again"):
        list(c.keys())


def test_a_damaged_record_header_is_a_bad_file_naming_the_record(built):
    _, cache, ds = built
    _flip_in_file(cache / "data.mdb", b"MLKP", 0, ord("X"))
    with ProposalCache.open(cache) as c:
        bad = [r.image_id for r in ds.records if not _readable(c, r.image_id)]
    assert len(bad) == 1


def _readable(cache: ProposalCache, image_id: str) -> bool:
    try:
        cache.get(image_id)
    except BadFile as e:
        assert str(e).startswith(f"malformed proposal record {image_id!r} in {cache.path}: header b'XLKP' v2")
        assert str(e).endswith("(the parameters are in its meta.json)")
        return False
    return True


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_200_flipped_bytes_end_as_one_clear_error(built, seed):
    """Bytes flipped anywhere in data.mdb (its header, the B-tree, keys, records) end as an mlkd error naming the
    cache, never a traceback or a signal. (LMDB has no checksums: flips inside float values go unseen.)"""
    train, cache, _ = built
    data = cache / "data.mdb"
    raw = bytearray(data.read_bytes())
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(raw), 200, replace=False):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
    proc = _run("proposals", "info", "--cache", str(cache), "--dataset", str(train))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("mlkd proposals: error: ") and "Traceback" not in proc.stderr
    assert str(cache) in proc.stderr


# -- a file-size limit while a cache is written -----------------------------------------------------------------
WRITE_UNDER_LIMIT = """\
import resource, sys
import numpy as np
from mlkd.errors import CannotWrite
from mlkd.proposals import ProposalCache, make_meta
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # Python ignores the SIGXFSZ this sends
meta = make_meta("test", {}, {"name": "d", "split": "s", "classes": ["a"], "num_images": 40, "images_hash": "x"})
try:
    with ProposalCache.create(sys.argv[1], meta) as cache:
        for i in range(0, 40, 4):
            cache.put_many((f"img{j}", np.ones((2000, 4)), np.ones(2000)) for j in range(i, i + 4))
except CannotWrite as e:
    print(e)
    sys.exit(1)
"""


def test_a_file_size_limit_while_writing_a_cache_is_cannot_write_keeping_what_was_committed(tmp_path):
    path = tmp_path / "c"
    proc = _run(str(path), code=WRITE_UNDER_LIMIT)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith(f"cannot write proposal cache {path}: mdb_txn_commit: ")  # LMDB says EIO
    assert "reached the file-size limit of 200000 bytes (`ulimit -f`)" in proc.stdout and "Traceback" not in proc.stderr
    with ProposalCache.open(path) as cache:  # the transactions committed before the limit are whole
        assert 0 < len(cache) < 40 and len(cache) % 4 == 0
        assert all(cache.get(k)[0].shape == (2000, 4) for k in cache.keys())


# -- teacher_targets.pt: a cache of the run folder, recomputed when it cannot be trusted ------------------------
def _targets_dataset() -> MultiLabelDataset:
    records = [ImageRecord(f"img{i}", Path(f"img{i}.png"), np.array([1, 0, 0], np.int8)) for i in range(3)]
    return MultiLabelDataset("d", "train", ["a", "b", "c"], records)


def _targets(ds: MultiLabelDataset) -> dict:
    return {"key": {"k": 1}, "probs": {r.image_id: torch.full((2, 3), 0.25) for r in ds.records}}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _write_bad(path: Path, ds: MultiLabelDataset, kind: str) -> None:
    good = _targets(ds)
    if kind == "truncated":
        torch.save(good, path)
        os.truncate(path, path.stat().st_size // 2)
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "hostile pickle":  # weights_only refuses to run it; it must not end the run either
        torch.save({"key": {"k": 1}, "probs": _Evil()}, path)
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    else:
        probs = good["probs"]
        probs["img1"] = {"wrong shape": torch.zeros(3, 3), "nan": torch.full((2, 3), float("nan")),
                         "int": torch.zeros(2, 3, dtype=torch.int64), "out of range": torch.full((2, 3), 1.5),
                         "missing image": None}[kind]
        if probs["img1"] is None:
            del probs["img1"]
        torch.save(good, path)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "hostile pickle", "not a dict", "wrong shape", "nan", "int",
                                  "out of range", "missing image"])
def test_an_unreadable_or_ill_formed_targets_file_is_recomputed_with_a_warning(tmp_path, caplog, kind):
    """It is a cache of the run folder: one teacher pass rebuilds it exactly, so a bad one is logged and treated as
    absent (a resumed run used to end in a torch.load traceback, or trust wrong targets)."""
    from mlkd.distill.cache import _saved_targets
    ds, path = _targets_dataset(), tmp_path / "teacher_targets.pt"
    _write_bad(path, ds, kind)
    assert _saved_targets(path, {"k": 1}, DistInfo(), ds) is None
    assert f"{path} " in caplog.text and "the teacher's targets are computed again" in caplog.text
    if kind in ("wrong shape", "nan", "int", "out of range", "missing image"):
        assert "image 'img1'" in caplog.text


def test_a_valid_targets_file_is_used_and_a_stale_one_ignored_silently(tmp_path, caplog):
    from mlkd.distill.cache import _saved_targets
    ds, path = _targets_dataset(), tmp_path / "teacher_targets.pt"
    torch.save(_targets(ds), path)
    assert torch.equal(_saved_targets(path, {"k": 1}, DistInfo(), ds)["probs"]["img2"], torch.full((2, 3), 0.25))
    assert _saved_targets(path, {"k": 2}, DistInfo(), ds) is None and caplog.text == ""
