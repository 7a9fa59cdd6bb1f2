"""The LMDB proposal cache, generation over a dataset (failures, resume, workers), shards and merge."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mlkd.cli import main
from mlkd.data import CustomDataset, Warp
from mlkd.data.base import FileStamp
from mlkd.data.synthetic import generate
from mlkd.errors import BadFile
from mlkd.models.inputs import teacher_inputs
from mlkd.proposals import ProposalCache, generate_proposals, make_meta, merge_caches, parse_shard, shard_indices
from mlkd.proposals.attach import check_cache_matches, open_split, require_proposals
from mlkd.proposals.cache import decode_record, encode_record, record_stamp
from mlkd.proposals.methods import resolve_params

SS = {"mode": "fast", "max_proposals": 50}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifests = generate(out, 8, seed=1, image_size=96, val_fraction=0.25, progress=False)
    return out, manifests


def _train(synth) -> CustomDataset:
    return CustomDataset(synth[1]["train"])


def _meta(ds) -> dict:
    return make_meta("test", {"a": 1}, ds.identity.to_dict())


def test_record_round_trip_including_zero_proposals():
    boxes = np.array([[1.5, 2, 3, 4], [0, 0, 1e4, 7.25]], np.float64)
    b, s = decode_record(encode_record(boxes, [0.9, 0.1]), "x")
    assert b.dtype == np.float32 and np.array_equal(b, boxes.astype(np.float32)) and s.tolist() == pytest.approx([0.9, 0.1])
    b, s = decode_record(encode_record(np.zeros((0, 4)), np.zeros(0)), "x")
    assert b.shape == (0, 4) and s.shape == (0,)
    b[:] = 1  # decoded arrays are writable copies (transforms modify them)


def test_a_record_with_its_image_file_stamp_round_trips():
    stamp = FileStamp(123456, 1_700_000_000_123_456_789, bytes(range(32)))
    data = encode_record(np.ones((3, 4)), [1, 2, 3], stamp)
    assert len(data) == 12 + 20 * 3 + 48 and data[4:8] == (2).to_bytes(4, "little")
    boxes, scores = decode_record(data, "x")
    assert boxes.tolist() == [[1] * 4] * 3 and scores.tolist() == [1, 2, 3]
    assert record_stamp(data, "x") == stamp and record_stamp(encode_record(np.ones((3, 4)), [1, 2, 3]), "x") is None


def test_generation_stamps_every_image_file(synth, tmp_path):
    """Version-3 caches: each record ends with the size, mtime and SHA-256 of the file it was computed from
    (hashed here with hashlib directly)."""
    ds = _train(synth)
    generate_proposals(ds, "selective_search", SS, tmp_path / "c", progress=False)
    with ProposalCache.open(tmp_path / "c") as cache:
        assert cache.meta["version"] == 3
        stamps = cache.stamps()
    assert set(stamps) == {r.image_id for r in ds.records}
    for r in ds.records:
        st = os.stat(r.path)
        want = hashlib.sha256(r.path.read_bytes()).digest()
        assert stamps[r.image_id] == FileStamp(st.st_size, st.st_mtime_ns, want)


def test_resuming_a_version_2_cache_upgrades_it_and_stamps_the_new_records(synth, tmp_path):
    ds = _train(synth)
    meta = {**make_meta("selective_search", resolve_params("selective_search", SS), ds.identity.to_dict()),
            "version": 2}
    with ProposalCache.create(tmp_path / "c", meta) as cache:  # as mlkd wrote it before file stamps
        cache.put(ds.records[0].image_id, np.ones((1, 4)) * [0, 0, 9, 9], np.ones(1))
    report = generate_proposals(ds, "selective_search", SS, tmp_path / "c", progress=False)
    assert report.skipped == 1 and report.processed == len(ds) - 1
    with ProposalCache.open(tmp_path / "c") as cache:
        assert cache.meta["version"] == 3 and set(cache.stamps()) == {r.image_id for r in ds.records[1:]}
    assert open_split(str(synth[1]["train"]), proposals=str(tmp_path / "c")).proposals is not None


@pytest.mark.parametrize("data, message", [
    (b"MLK", "shorter than the header"),
    (b"XXXX" + bytes(8), "header b'XXXX'"),
    (encode_record(np.zeros((2, 4)), np.zeros(2))[:-4], "for R=2"),
])
def test_malformed_record_names_the_problem(data, message):
    with pytest.raises(BadFile, match=f"malformed proposal record 'img7'.*{message}.*; rebuild it$"):
        decode_record(data, "'img7'", "; rebuild it")


def test_cache_round_trip_and_dataset_attachment(synth, tmp_path):
    ds = _train(synth)
    rng = np.random.default_rng(0)
    stored = {}
    with ProposalCache.create(tmp_path / "c", _meta(ds)) as cache:
        for i, r in enumerate(ds.records):
            n = 0 if i == 0 else int(rng.integers(1, 30))  # image 0: zero proposals
            xy = rng.uniform(0, 40, (n, 2))
            stored[r.image_id] = (np.concatenate([xy, xy + rng.uniform(1, 40, (n, 2))], 1).astype(np.float32),
                                  rng.random(n).astype(np.float32))
        cache.put_many((k, *v) for k, v in stored.items())
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["num_images"] == len(ds) and meta["dataset"]["labels_hash"] == ds.identity.labels_hash
    cache = ProposalCache.open(tmp_path / "c")
    assert len(cache) == len(ds) and set(cache.keys()) == set(stored)
    check_cache_matches(ds, cache)
    ds = ds.view(transform=Warp(48), proposals=cache)
    for i, r in enumerate(ds.records):
        image, target = ds[i]
        h, w = (int(v) for v in target["orig_size"])
        boxes, scores = stored[r.image_id]
        want = torch.from_numpy(boxes) * torch.tensor([48 / w, 48 / h, 48 / w, 48 / h])
        assert torch.allclose(target["proposals"], want) and torch.equal(target["proposal_scores"], torch.from_numpy(scores))
    assert ds[0][1]["proposals"].shape == (0, 4)
    with pytest.raises(KeyError, match="image id 'nope' is not in proposal cache"):
        cache.get("nope")
    with pytest.raises(PermissionError, match="read-only"):
        cache.put("x", np.zeros((0, 4)), np.zeros(0))
    cache.close()


def test_a_dataset_refuses_a_cache_of_other_images_naming_the_fields_and_the_images(synth, tmp_path):
    train, val = _train(synth), CustomDataset(synth[1]["val"])
    with ProposalCache.create(tmp_path / "c", _meta(val)) as cache:
        cache.put(val.records[0].image_id, np.zeros((0, 4)), np.zeros(0))
    with pytest.raises(ValueError) as e:
        open_split(str(synth[1]["train"]), proposals=str(tmp_path / "c"))
    msg = str(e.value)
    assert "was not built for the images of" in msg and f"num_images: dataset has {len(train)}, proposal cache" in msg
    assert f"{train.identity.images_hash!r}" in msg and f"{val.identity.images_hash!r}" in msg
    assert f"images of the dataset not in the cache ({len(train)})" in msg and train.records[0].image_id in msg
    assert "images in the cache not in the dataset (1)" in msg and val.records[0].image_id in msg


def test_a_label_policy_change_reuses_the_cache_but_other_images_do_not(synth, tmp_path):
    """Proposals depend on the images only: another class list (a label policy) keeps the cache usable, the
    identity check is on the image ids and file names."""
    ds = _train(synth)
    with ProposalCache.create(tmp_path / "c", _meta(ds)) as cache:
        cache.put_many((r.image_id, np.zeros((1, 4)), np.ones(1)) for r in ds.records)
    relabelled = CustomDataset(synth[1]["train"], classes=list(reversed(ds.classes)))  # other labels, same images
    assert relabelled.identity.labels_hash != ds.identity.labels_hash
    assert relabelled.identity.images_hash == ds.identity.images_hash
    assert open_split(str(synth[1]["train"]), {"classes": list(reversed(ds.classes))}, str(tmp_path / "c")).proposals
    lines = synth[1]["train"].read_text().splitlines()
    fewer = synth[1]["train"].with_name("fewer.jsonl")
    fewer.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=rf"(?s)num_images: dataset has {len(ds) - 1}.*images_hash.*"
                                         r"images in the cache not in the dataset \(1\)"):
        open_split(str(fewer), proposals=str(tmp_path / "c"))


def test_a_version_1_cache_is_still_read_and_matched_on_labels_as_before(synth, tmp_path):
    ds = _train(synth)
    with ProposalCache.create(tmp_path / "c", _meta(ds)) as cache:
        cache.put_many((r.image_id, np.zeros((1, 4)), np.ones(1)) for r in ds.records)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    old = {k: v for k, v in meta["dataset"].items() if k not in ("labels_hash", "images_hash")}
    meta.update(version=1, dataset={**old, "manifest_hash": ds.identity.labels_hash})  # as mlkd 0.1 wrote it
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    assert open_split(str(synth[1]["train"]), proposals=str(tmp_path / "c")).proposals.meta["version"] == 1
    with pytest.raises(ValueError, match=r"(?s)version-1 cache, matched on labels too.*labels_hash"):
        open_split(str(synth[1]["train"]), {"classes": list(reversed(ds.classes))}, str(tmp_path / "c"))


def test_open_rejects_missing_or_corrupt_meta(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a proposal cache"):
        ProposalCache.open(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt proposal cache meta"):
        ProposalCache.open(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "mlkd-proposals"}))
    with pytest.raises(ValueError, match=r"missing keys \['version', 'method'"):
        ProposalCache.open(tmp_path)


def test_generation_reports_a_corrupt_and_a_missing_image_and_caches_the_rest(synth, tmp_path):
    out, manifests = synth
    ds = _train(synth)
    ds.records[1].path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # a corrupt image file
    ds.records[2].path = out / "images" / "train" / "absent.png"  # an image that vanished after loading
    try:
        report = generate_proposals(ds, "selective_search", SS, tmp_path / "c", workers=2, progress=False)
        assert set(report.failed) == {ds.records[1].image_id, ds.records[2].image_id}
        assert "cannot decode image" in report.failed[ds.records[1].image_id]
        assert "not found" in report.failed[ds.records[2].image_id]
        assert report.processed == len(ds) - 2
        cache = ProposalCache.open(tmp_path / "c")
        assert len(cache) == len(ds) - 2 and set(cache.read_failures()) == set(report.failed)
        cache.close()
        again = generate_proposals(ds, "selective_search", SS, tmp_path / "c", workers=0, progress=False)
        assert again.skipped == len(ds) - 2 and set(again.failed) == set(report.failed)  # retried, failed again
    finally:
        generate(out, 8, seed=1, image_size=96, val_fraction=0.25, progress=False)  # restore the fixture


def test_resume_computes_only_what_is_missing_and_equals_a_fresh_run(synth, tmp_path):
    ds = _train(synth)
    full = generate_proposals(ds, "selective_search", SS, tmp_path / "full", workers=0, progress=False)
    assert full.processed == len(ds) and not full.failed
    half = CustomDataset(synth[1]["train"])
    half.records = half.records[:3]  # an interrupted run: same identity, only 3 images done
    generate_proposals(half, "selective_search", SS, tmp_path / "resumed", workers=0, progress=False)
    rest = generate_proposals(ds, "selective_search", SS, tmp_path / "resumed", workers=2, progress=False)
    assert (rest.skipped, rest.processed) == (3, len(ds) - 3)
    a, b = ProposalCache.open(tmp_path / "full"), ProposalCache.open(tmp_path / "resumed")
    for r in ds.records:  # workers, order and resumption do not change any box
        assert all(np.array_equal(x, y) for x, y in zip(a.get(r.image_id), b.get(r.image_id)))
    a.close(), b.close()
    with pytest.raises(ValueError, match=r"(?s)built with other settings.*params.max_proposals: 50 != 20"):
        generate_proposals(ds, "selective_search", {**SS, "max_proposals": 20}, tmp_path / "full", progress=False)


def test_shards_partition_the_images_and_merge_equals_one_run(synth, tmp_path):
    assert parse_shard("1/3") == (1, 3) and list(shard_indices(7, (1, 3))) == [1, 4]
    for bad in ("3/3", "1-3", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    ds = _train(synth)
    generate_proposals(ds, "selective_search", SS, tmp_path / "one", progress=False)
    for i in range(3):
        generate_proposals(ds, "selective_search", SS, tmp_path / f"s{i}", shard=(i, 3), progress=False)
    report = merge_caches(tmp_path / "merged", [tmp_path / f"s{i}" for i in range(3)], dataset=ds, progress=False)
    assert report.complete and report.num_images == len(ds)
    one, merged = ProposalCache.open(tmp_path / "one"), ProposalCache.open(tmp_path / "merged")
    assert merged.meta["shard"] is None and merged.meta["params"] == one.meta["params"]
    for r in ds.records:
        assert all(np.array_equal(x, y) for x, y in zip(one.get(r.image_id), merged.get(r.image_id)))
    one.close(), merged.close()
    partial = merge_caches(tmp_path / "partial", [tmp_path / "s0", tmp_path / "s2"], dataset=ds, progress=False)
    assert not partial.complete and partial.missing_shards == [1]
    assert partial.missing_ids == [ds.records[i].image_id for i in shard_indices(len(ds), (1, 3))]


def test_merge_refuses_shards_built_differently(synth, tmp_path):
    ds = _train(synth)
    generate_proposals(ds, "selective_search", SS, tmp_path / "a", shard=(0, 2), progress=False)
    generate_proposals(ds, "selective_search", {**SS, "max_proposals": 10}, tmp_path / "b", shard=(1, 2),
                       progress=False)
    with pytest.raises(ValueError, match=r"(?s)built differently.*params.max_proposals: 50 != 10"):
        merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"], progress=False)
    with pytest.raises(ValueError, match=r"shard index\(es\) \[0\] given more than once"):
        merge_caches(tmp_path / "m2", [tmp_path / "a", tmp_path / "a"], progress=False)


def _filled(ds, path, empty=()):
    with ProposalCache.create(path, _meta(ds)) as cache:
        cache.put_many((r.image_id, np.zeros((0, 4)) if r.image_id in empty else np.ones((3, 4)) * [0, 0, 9, 9],
                        np.ones(0 if r.image_id in empty else 3)) for r in ds.records)
    return path


def test_a_truncated_cache_is_refused_with_a_message_instead_of_a_bus_error(synth, tmp_path):
    """LMDB maps data.mdb: reading past the end of a cut file kills the process with SIGBUS (exit 135, no
    message). Opening checks the file against its index; a child process shows what a user would see."""
    ds = _train(synth)
    path = _filled(ds, tmp_path / "c")
    data = path / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    proc = subprocess.run([sys.executable, "-m", "mlkd", "proposals", "info", "--cache", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert f"proposal cache {path} is damaged: data.mdb has" in proc.stderr and "build it again" in proc.stderr
    with pytest.raises(OSError, match="is damaged"):
        ProposalCache.create(path, _meta(ds), resume=True)  # a resumed generation refuses it, before LMDB writes
    with pytest.raises(OSError, match="is damaged"):
        open_split(str(synth[1]["train"]), proposals=str(path))


def test_an_incomplete_cache_is_refused_when_attached_listing_the_missing_images_and_why(synth, tmp_path):
    ds = _train(synth)
    with ProposalCache.create(tmp_path / "c", _meta(ds)) as cache:
        cache.put_many((r.image_id, np.ones((2, 4)), np.ones(2)) for r in ds.records[:-2])
        cache.write_failures({ds.records[-1].image_id: "cannot decode image x.png"})
    with pytest.raises(ValueError, match=rf"(?s)lacks 2 of the {len(ds)} images of custom/train.*"
                                         rf"{ds.records[-2].image_id}\n.*{ds.records[-1].image_id}: cannot decode "
                                         r"image x.png.*computes only what is missing"):
        open_split(str(synth[1]["train"]), proposals=str(tmp_path / "c"))


def test_images_without_proposals_are_listed_by_the_cache_and_refused_before_training(synth, tmp_path, capsys):
    ds = _train(synth)
    empty = {ds.records[1].image_id}
    path = _filled(ds, tmp_path / "c", empty)
    assert ProposalCache.open(path).meta["empty_images"] == sorted(empty)
    split = open_split(str(synth[1]["train"]), proposals=str(path))
    with pytest.raises(ValueError, match=rf"(?s)1 images of custom/train have no proposal in .*c, and training "
                                         rf"needs at least one per image:\s+{ds.records[1].image_id}"):
        require_proposals(split, "training")
    require_proposals(split.view(indices=[0, 2]), "training")  # the other images are fine
    assert main(["proposals", "info", "--cache", str(path)]) == 0
    assert f"images with no proposal: 1 ({ds.records[1].image_id})" in capsys.readouterr().out
    targets = [{"image_id": "a", "proposals": torch.zeros(0, 4), "proposal_scores": torch.zeros(0),
                "labels": torch.zeros(2)}]
    with pytest.raises(ValueError, match=r"image\(s\) \['a'\] have no proposal"):
        teacher_inputs(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), targets, torch.device("cpu"), "torchvision")


def test_a_reader_nobody_holds_gives_way_to_a_writer_but_a_held_one_does_not(synth, tmp_path):
    """A run that opened a split read-only (datasets in reference cycles, never closed) and then resumes proposal
    generation for it in the same process, as `run_demo` twice in one process does; a reader still in use keeps
    the writer out, naming the store."""
    out = tmp_path / "cache"
    ds = _train(synth)
    generate_proposals(ds, "selective_search", {"mode": "fast", "max_proposals": 20}, out, progress=False)
    held = ProposalCache.open(out)
    cycle = {"cache": ProposalCache.open(out)}
    cycle["self"] = cycle  # only the cyclic collector frees it
    del cycle
    with pytest.raises(OSError, match=r"LMDB store .*cache is open read-only in this process; close it before "
                                      r"writing"):
        generate_proposals(ds, "selective_search", {"mode": "fast", "max_proposals": 20}, out, progress=False)
    held.close()
    cycle = {"cache": ProposalCache.open(out)}
    cycle["self"] = cycle
    del cycle
    report = generate_proposals(ds, "selective_search", {"mode": "fast", "max_proposals": 20}, out, progress=False)
    assert report.skipped == len(ds) and report.processed == 0
