"""WSDDN .mat and release datalist proposal files: readers on hand-written fixtures, import/export round trips,
and the `mlkd proposals` command line."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from mlkd.cli import main
from mlkd.data import CustomDataset
from mlkd.data.synthetic import generate
from mlkd.errors import BadInput
from mlkd.proposals import (make_meta, ProposalCache, export_datalist, export_mat, import_datalist, import_mat, read_datalist,
                            read_mat_proposals)
from mlkd.proposals.formats import write_mat_proposals, boxes_to_mat, format_datalist_line, mat_to_boxes, parse_datalist_line


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, generate(out, 6, seed=2, image_size=80, val_fraction=0.0, progress=False)["train"]


def _cell(items, shape):
    cell = np.empty(shape, dtype=object)
    for i, v in enumerate(items):
        cell.flat[i] = v
    return cell


def test_mat_convention_hand_computed():
    # MATLAB [y1 x1 y2 x2], 1-based inclusive: columns 3..12, rows 5..9 -> x1=2, y1=4, x2=12, y2=9 (edges)
    assert mat_to_boxes(np.array([[5, 3, 9, 12]])).tolist() == [[2, 4, 12, 9]]
    assert boxes_to_mat(np.array([[2, 4, 12, 9]], np.float32)).tolist() == [[5, 3, 9, 12]]


@pytest.mark.parametrize("orientation", [(1, 3), (3, 1)])  # WSDDN stores 1 x N cells, Fast R-CNN's SS N x 1
def test_read_mat_in_the_wsddn_layout(tmp_path, orientation):
    boxes = [np.array([[5, 3, 9, 12], [1, 1, 20, 30]], np.float64), np.zeros((0, 4)), np.array([[2, 2, 4, 4]], np.single)]
    scores = [np.array([[0.9], [0.2]]), np.zeros((0, 1)), np.array([[0.5]])]
    scipy.io.savemat(tmp_path / "p.mat", {"images": _cell(["000005", "000007", "000009"], orientation),
                                          "boxes": _cell(boxes, orientation), "boxScores": _cell(scores, orientation)})
    got = read_mat_proposals(tmp_path / "p.mat")
    assert list(got) == ["000005", "000007", "000009"]
    assert got["000005"][0].tolist() == [[2, 4, 12, 9], [0, 0, 30, 20]] and got["000005"][1].tolist() == pytest.approx([0.9, 0.2])
    assert got["000007"][0].shape == (0, 4) and got["000009"][0].tolist() == [[1, 1, 4, 4]]


def test_read_mat_numeric_ids_no_scores_and_errors(tmp_path):
    scipy.io.savemat(tmp_path / "coco.mat", {"images": _cell([139.0, 285.0], (1, 2)),
                                             "boxes": _cell([np.array([[1, 1, 2, 2]]), np.array([[1, 1, 3, 3]])], (1, 2))})
    got = read_mat_proposals(tmp_path / "coco.mat")
    assert list(got) == ["139", "285"] and got["285"][1].tolist() == [1.0]
    scipy.io.savemat(tmp_path / "bad.mat", {"images": _cell(["a"], (1, 1)), "rois": _cell([np.zeros((1, 4))], (1, 1))})
    with pytest.raises(ValueError, match=r"has no variable 'boxes' \(found \['images', 'rois'\]\)"):
        read_mat_proposals(tmp_path / "bad.mat")
    scipy.io.savemat(tmp_path / "shape.mat", {"images": _cell(["a"], (1, 1)), "boxes": _cell([np.zeros((2, 5))], (1, 1))})
    with pytest.raises(ValueError, match=r"boxes\{1\} \(image 'a'\) has shape \(2, 5\), expected R x 4"):
        read_mat_proposals(tmp_path / "shape.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(ValueError, match="cannot read .* as a MATLAB .mat file"):
        read_mat_proposals(tmp_path / "junk.mat")


def test_datalist_line_hand_written_and_errors():
    path, labels, boxes, scores = parse_datalist_line("img/a.jpg 0 1 1 10 20 30 40 0.5 0 0 5 5 1", 3, "f:1")
    assert path == "img/a.jpg" and labels.tolist() == [0, 1, 1]
    assert boxes.tolist() == [[10, 20, 30, 40], [0, 0, 5, 5]] and scores.tolist() == [0.5, 1.0]
    assert parse_datalist_line("a.jpg 1 0", 2, "f:1")[2].shape == (0, 4)  # an image without proposals
    with pytest.raises(ValueError, match=r"f:3: 8 fields; expected 1 path \+ 3 labels \+ 5 numbers"):
        parse_datalist_line("a.jpg 0 1 1 1 2 3 4", 3, "f:3")
    with pytest.raises(ValueError, match="f:1: 'x' is not a number"):
        parse_datalist_line("a.jpg 0 x", 2, "f:1")
    with pytest.raises(ValueError, match=r"labels must be 0 or 1, got \[2.0\]"):
        parse_datalist_line("a.jpg 0 2", 2, "f:1")
    assert parse_datalist_line("a.jpg 1 9 0 5 5 1", 1, "f:1")[2].tolist() == [[9, 0, 5, 5]]  # for the box validator
    with pytest.raises(ValueError, match="cannot contain whitespace"):
        format_datalist_line("my image.jpg", np.array([1]), np.zeros((0, 4)), np.zeros(0))


def _filled_cache(ds, path):
    rng = np.random.default_rng(5)
    with ProposalCache.create(path, make_meta("test", {}, ds.identity.to_dict())) as cache:
        for i, r in enumerate(ds.records):
            n = 0 if i == 1 else 7
            xy = rng.uniform(0, 30, (n, 2)).astype(np.float32)
            cache.put(r.image_id, np.concatenate([xy, xy + rng.uniform(1, 30, (n, 2))], 1),  # inside the images
                      rng.random(n).astype(np.float32) / 3)  # scores like 0.1234567: float32 text must round-trip
    return ProposalCache.open(path)


def _same_cache(a, b, ds):
    for r in ds.records:
        (ba, sa), (bb, sb) = a.get(r.image_id), b.get(r.image_id)
        assert np.array_equal(ba, bb) and np.array_equal(sa, sb), r.image_id


def test_datalist_export_import_round_trip_exact(synth, tmp_path):
    root, manifest = synth
    ds = CustomDataset(manifest)
    cache = _filled_cache(ds, tmp_path / "c")
    export_datalist(tmp_path / "list.txt", ds, cache, relative_to=root, progress=False)
    lines = (tmp_path / "list.txt").read_text().splitlines()
    assert len(lines) == len(ds) and lines[0].split()[0] == ds.records[0].image_id
    assert len(lines[1].split()) == 1 + ds.num_classes  # the image with zero proposals
    entries = read_datalist(tmp_path / "list.txt", ds.num_classes)
    assert all(np.array_equal(e.labels, r.labels) for e, r in zip(entries, ds.records))
    report = import_datalist(tmp_path / "list.txt", ds, tmp_path / "back", root=root, progress=False)
    assert report.imported == len(ds) and not report.extra and not report.missing
    _same_cache(cache, ProposalCache.open(tmp_path / "back"), ds)


def test_datalist_import_matches_absolute_and_suffix_paths_and_checks_labels(synth, tmp_path):
    root, manifest = synth
    ds = CustomDataset(manifest)
    r0, r1 = ds.records[0], ds.records[1]
    lab0 = " ".join(map(str, r0.labels.tolist()))
    (tmp_path / "l.txt").write_text(f"{r0.path} {lab0} 1 2 3 4 0.5\n"  # absolute path
                                    f"/elsewhere/{r1.image_id} {' '.join(map(str, r1.labels.tolist()))}\n"  # same tail
                                    f"other/x.png {lab0}\n")  # not in the dataset: reported as extra
    report = import_datalist(tmp_path / "l.txt", ds, tmp_path / "c", allow_missing=True, progress=False)
    assert report.imported == 2 and report.extra == ["other/x.png"] and len(report.missing) == len(ds) - 2
    cache = ProposalCache.open(tmp_path / "c")
    assert cache.get(r0.image_id)[0].tolist() == [[1, 2, 3, 4]] and cache.get(r1.image_id)[0].shape == (0, 4)
    with pytest.raises(ValueError, match=r"has no proposals for 4 of the 6 dataset images"):
        import_datalist(tmp_path / "l.txt", ds, tmp_path / "c2", progress=False)
    flipped = 1 - r0.labels
    (tmp_path / "bad.txt").write_text(f"{r0.path} {' '.join(map(str, flipped.tolist()))}\n")
    with pytest.raises(ValueError, match=r"(?s)labels disagree with the dataset.*class '\w+' is \d in the datalist"):
        import_datalist(tmp_path / "bad.txt", ds, tmp_path / "c3", allow_missing=True, progress=False)


def test_mat_export_import_round_trip_exact(synth, tmp_path):
    ds = CustomDataset(synth[1])
    cache = _filled_cache(ds, tmp_path / "c")
    export_mat(tmp_path / "p.mat", ds, cache, progress=False)
    raw = scipy.io.loadmat(tmp_path / "p.mat")
    assert set(raw) >= {"images", "boxes", "boxScores"} and raw["boxes"].dtype == object
    b0 = cache.get(ds.records[0].image_id)[0]
    assert np.allclose(raw["boxes"].ravel()[0], boxes_to_mat(b0))  # stored 1-based [y1 x1 y2 x2]
    import_mat(tmp_path / "p.mat", ds, tmp_path / "back", progress=False)
    _same_cache(cache, ProposalCache.open(tmp_path / "back"), ds)
    scipy.io.savemat(tmp_path / "other.mat", {"images": _cell(["zzz"], (1, 1)), "boxes": _cell([np.zeros((0, 4))], (1, 1))})
    with pytest.raises(ValueError, match=r"none of the 1 image ids in .* \(e.g. \['zzz'\]\) is an image id"):
        import_mat(tmp_path / "other.mat", ds, tmp_path / "x", progress=False)


def test_cli_generate_info_export_import_and_errors(synth, tmp_path, capsys):
    root, manifest = synth
    ds_arg = ["--dataset", str(manifest)]
    cache = str(tmp_path / "eb")
    assert main(["proposals", *ds_arg, "--method", "edge_boxes", "--out", cache, "--workers", "0",
                 "--max-proposals", "30", "--quiet"]) == 0
    assert "6 images computed" in capsys.readouterr().out
    assert main(["proposals", *ds_arg, "--method", "edge_boxes", "--out", cache, "--max-proposals", "30",
                 "--quiet"]) == 0
    assert "0 images computed" in capsys.readouterr().out and "6 already cached" in capsys.readouterr().out + "6 already cached"
    assert main(["proposals", "info", "--cache", cache, *ds_arg]) == 0
    out = capsys.readouterr().out
    assert "method edge_boxes" in out and '"max_proposals": 30' in out and "recall of" in out
    dl = str(tmp_path / "list.txt")
    assert main(["proposals", "export", "--cache", cache, *ds_arg, "--format", "datalist", "--out", dl,
                 "--relative-to", str(root), "--quiet"]) == 0
    assert main(["proposals", "import", "--format", "datalist", "--file", dl, *ds_arg, "--root", str(root),
                 "--out", str(tmp_path / "back"), "--quiet"]) == 0
    _same_cache(ProposalCache.open(cache), ProposalCache.open(tmp_path / "back"), CustomDataset(manifest))
    capsys.readouterr()
    assert main(["proposals", *ds_arg, "--out", str(tmp_path / "x")]) == 1
    assert "needs --method" in capsys.readouterr().err
    assert main(["proposals", *ds_arg, "--method", "selective_search", "--edge-model", "m.yml.gz",
                 "--out", str(tmp_path / "y")]) == 1
    assert "--edge-model is an EdgeBoxes option" in capsys.readouterr().err


def test_cli_reports_failed_images_with_exit_code_1(synth, tmp_path, capsys):
    root, _ = synth
    (tmp_path / "broken.png").write_bytes(b"\x00" * 50)
    good = CustomDataset(synth[1]).records[0]
    (tmp_path / "m.jsonl").write_text(f'{{"path": "{good.path}", "labels": []}}\n'
                                      f'{{"path": "broken.png", "labels": []}}\n')
    (tmp_path / "classes.txt").write_text("a\n")
    rc = main(["proposals", "--dataset", str(tmp_path / "m.jsonl"), "--method", "selective_search",
               "--out", str(tmp_path / "c"), "--workers", "0", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and "1 images computed" in out and "1 failed" in out and "failed broken.png: cannot decode image" in out
    assert len(ProposalCache.open(tmp_path / "c")) == 1


def test_a_mat_file_listing_an_image_twice_is_refused(tmp_path):
    write_mat_proposals(tmp_path / "p.mat", [("a", np.array([[1, 1, 5, 5]]), np.ones(1)),
                                             ("a", np.array([[2, 2, 6, 6]]), np.ones(1))])
    with pytest.raises(ValueError, match=r"image 'a' is listed twice \(entries 1 and 2 of 'images'\)"):
        read_mat_proposals(tmp_path / "p.mat")


# -- non-finite proposal scores: refused where they enter, naming the image and the proposal ----------------------
def _mat_with_scores(path, ds, bad_image, bad_score):
    """A WSDDN-layout .mat for every image of ``ds`` (3 valid boxes each), scores 0.5 but proposal 2 of image
    ``bad_image`` (0-based position), whose score is ``bad_score``; boxScores as float64 R x 1 cells."""
    n = len(ds.records)
    boxes = [np.array([[1, 1, 10, 10], [2, 3, 20, 30], [5, 5, 8, 9]], np.float64) for _ in range(n)]
    scores = [np.full((3, 1), 0.5) for _ in range(n)]
    scores[bad_image][1, 0] = bad_score
    scipy.io.savemat(path, {"images": _cell([r.image_id for r in ds.records], (1, n)),
                            "boxes": _cell(boxes, (1, n)), "boxScores": _cell(scores, (1, n))})
    return path


# 1e39 is finite in the float64 file and inf as the float32 mlkd stores
@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf"), (1e39, "inf")])
def test_a_non_finite_mat_score_is_refused_naming_the_image_and_the_proposal(synth, tmp_path, value, shown):
    ds = CustomDataset(synth[1])
    image_id = ds.records[3].image_id
    mat = _mat_with_scores(tmp_path / "p.mat", ds, 3, value)
    with pytest.raises(BadInput) as e:
        import_mat(mat, ds, tmp_path / "c", progress=False, bad_boxes="drop")
    assert str(e.value).startswith(f"{mat}: boxScores{{4}} of image {image_id!r}: 1 of 3 proposal scores are not "
                                   f"finite: proposal 2 has score {shown}")
    assert not (tmp_path / "c").exists()  # refused before the cache is created


def test_cli_mat_import_with_a_nan_score_exits_1_naming_it(synth, tmp_path, capsys):
    root, manifest = synth
    ds = CustomDataset(manifest)
    mat = _mat_with_scores(tmp_path / "p.mat", ds, 0, np.nan)
    assert main(["proposals", "import", "--format", "mat", "--file", str(mat), "--dataset", str(manifest), "--out",
                 str(tmp_path / "c"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"boxScores{{1}} of image {ds.records[0].image_id!r}: 1 of 3 proposal scores are not finite" in err
    assert "proposal 2 has score nan" in err and not (tmp_path / "c").exists()


def test_a_non_finite_datalist_score_is_refused_naming_the_line_and_the_proposal(synth, tmp_path):
    ds = CustomDataset(synth[1])
    r = ds.records[0]
    labels = " ".join(map(str, r.labels.tolist()))
    (tmp_path / "nan.txt").write_text(f"{r.path} {labels} 1 1 9 9 0.5 2 2 8 8 nan\n")
    with pytest.raises(BadInput, match=r"nan\.txt:1: proposal score nan is not finite"):
        import_datalist(tmp_path / "nan.txt", ds, tmp_path / "c", allow_missing=True, progress=False)
    # finite as text and as float64, but not as the float32 that mlkd stores
    (tmp_path / "big.txt").write_text(f"{r.path} {labels} 1 1 9 9 0.5 2 2 8 8 1e39 3 3 7 7 0.25\n")
    with pytest.raises(BadInput) as e:
        import_datalist(tmp_path / "big.txt", ds, tmp_path / "c", allow_missing=True, progress=False)
    assert str(e.value).startswith(f"{tmp_path / 'big.txt'}:1 (image {r.image_id!r}): 1 of 3 proposal scores are not "
                                   "finite: proposal 2 has score inf")
    assert not (tmp_path / "c").exists()
