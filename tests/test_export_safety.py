"""`mlkd export` and its --out folder: another model's export, another format or files mlkd did not write are
refused untouched unless --overwrite, which replaces the previous export without leaving its files behind; a file, a
read-only folder or a write that fails half-way is a one-line error that leaves no partial export."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from mlkd.cli import main
from mlkd.errors import BadInput, CannotWrite
from mlkd.export.exporter import export_checkpoint
from mlkd.export.safetensors import export_model_dir
from mlkd.models.build import build_student
from mlkd.models.configs import StudentModelConfig
from mlkd.training.student import StudentConfig
from mlkd.utils.checkpoint import load_checkpoint, read_model_dir, save_checkpoint
from mlkd.utils.config import to_dict

torch.set_num_threads(1)
CLASSES = ["a", "b", "c"]
SMALL = StudentModelConfig(backbone="tiny", tiny_channels=(8, 16), tiny_convs_per_block=1,
                           input_convention="torchvision", hidden=16, roi_size=2, dropout=0.0, image_size=32)
SAFETENSORS = ["README.md", "config.json", "export.json", "model.safetensors"]
CAFFE = ["README.md", "export.json", "student.caffemodel", "student.prototxt"]


def _student(path, seed):
    torch.manual_seed(seed)
    model = build_student(SMALL, len(CLASSES))
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(StudentConfig(model=SMALL)),
                           "classes": CLASSES, "input_convention": "torchvision", "kind": "student", "epoch": 0})
    return path


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """Two students of the same recipe (different weights), as two runs of one config would give."""
    root = tmp_path_factory.mktemp("students")
    return _student(root / "a.pt", 0), _student(root / "b.pt", 1)


def _export(capsys, ckpt, fmt, out, *extra):
    rc = main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(out), *extra])
    return rc, capsys.readouterr().err


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _weights_of(folder):
    return read_model_dir(folder)["model"]


def _same_weights(folder, ckpt):
    got, want = _weights_of(folder), load_checkpoint(ckpt)["model"]
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# -- what the folder holds ---------------------------------------------------------------------------------------
def test_another_models_export_is_refused_untouched_unless_overwrite(students, tmp_path, capsys):
    a, b = students
    out = tmp_path / "model"
    assert _export(capsys, a, "safetensors", out)[0] == 0
    before = _snapshot(out)
    rc, err = _export(capsys, b, "safetensors", out)
    assert rc == 1
    assert err.strip() == (f"mlkd export: error: {out} already holds a safetensors export of {a}, not of {b}; "
                           "pass --overwrite (overwrite=True) to replace it, or export into a new or empty folder")
    assert _snapshot(out) == before
    assert _export(capsys, b, "safetensors", out, "--overwrite") == (0, "")
    assert _listing(out) == SAFETENSORS and _same_weights(out, b)
    assert f"From `{b}`" in (out / "README.md").read_text()


def test_another_format_is_refused_and_overwrite_leaves_no_file_of_the_old_export(students, tmp_path, capsys):
    a, _ = students
    out = tmp_path / "export"
    assert _export(capsys, a, "safetensors", out)[0] == 0
    before = _snapshot(out)
    rc, err = _export(capsys, a, "caffe", out)
    assert rc == 1 and f"{out} already holds a safetensors export of {a}, not a caffe export; pass --overwrite" in err
    assert _snapshot(out) == before
    assert _export(capsys, a, "caffe", out, "--overwrite") == (0, "")
    assert _listing(out) == CAFFE  # no model.safetensors / config.json of the safetensors export left
    assert json.loads((out / "export.json").read_text())["format"] == "caffe"
    rc, err = _export(capsys, a, "safetensors", out)
    assert rc == 1 and f"{out} already holds a caffe export of {a}, not a safetensors export" in err


def test_the_same_export_again_is_refreshed_and_its_stale_files_removed(students, tmp_path, capsys):
    a, _ = students
    out = tmp_path / "onnx"
    assert _export(capsys, a, "onnx", out)[0] == 0
    record = json.loads((out / "export.json").read_text())
    record["files"]["onnx_int8"] = "student_int8.onnx"  # as if the previous export had been run with --int8
    (out / "export.json").write_text(json.dumps(record))
    (out / "student_int8.onnx").write_bytes(b"old int8 model")
    assert _export(capsys, a, "onnx", out) == (0, "")
    assert _listing(out) == ["README.md", "export.json", "student.onnx"]
    assert _export(capsys, a, "safetensors", tmp_path / "st")[0] == 0
    assert _export(capsys, a, "safetensors", tmp_path / "st") == (0, "")  # refreshing needs no --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(capsys, a, "safetensors", empty) == (0, "") and _listing(empty) == SAFETENSORS


def test_files_mlkd_did_not_write_are_refused_and_kept_by_overwrite(students, tmp_path, capsys):
    a, _ = students
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    rc, err = _export(capsys, a, "safetensors", out)
    assert rc == 1 and (f"{out} holds files that are not part of an mlkd export: notes.txt, photos/; pass "
                        "--overwrite (overwrite=True) to write the export there anyway (files named as an export's "
                        "are replaced, the others kept)") in err
    assert _listing(out) == ["notes.txt", "photos"]
    assert _export(capsys, a, "safetensors", out, "--overwrite") == (0, "")
    assert _listing(out) == sorted(SAFETENSORS + ["notes.txt", "photos"])
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_folder_mixed_by_an_earlier_export_is_refused_and_cleaned_by_overwrite(students, tmp_path, capsys):
    """What an earlier mlkd left after a Caffe export into a model folder: both exports' files, its README replaced."""
    a, _ = students
    out = tmp_path / "mixed"
    assert _export(capsys, a, "safetensors", out)[0] == 0
    export_checkpoint(a, "caffe", tmp_path / "caffe")
    for name in CAFFE:
        (out / name).write_bytes((tmp_path / "caffe" / name).read_bytes())
    rc, err = _export(capsys, a, "caffe", out)
    assert rc == 1 and (f"{out} holds files that are not part of its caffe export: config.json, model.safetensors; "
                        "pass --overwrite (overwrite=True) to write the export there anyway") in err
    assert _export(capsys, a, "caffe", out, "--overwrite") == (0, "") and _listing(out) == CAFFE


def test_a_model_folder_that_does_not_say_where_it_came_from_needs_overwrite(students, tmp_path, capsys):
    a, _ = students
    out = tmp_path / "model"
    assert _export(capsys, a, "safetensors", out)[0] == 0
    (out / "export.json").unlink()  # as a folder written by an older mlkd, or by hand
    rc, err = _export(capsys, a, "safetensors", out)
    assert rc == 1 and (f"{out} already holds a safetensors export (config.json, model.safetensors) whose folder (no "
                        "export.json) does not name its checkpoint") in err
    assert _export(capsys, a, "safetensors", out, "--overwrite")[0] == 0


def test_a_model_folder_is_not_exported_into_itself(students, tmp_path, capsys):
    a, _ = students
    folder = tmp_path / "model"
    assert _export(capsys, a, "safetensors", folder)[0] == 0
    rc, err = _export(capsys, folder, "onnx", folder, "--overwrite")
    assert rc == 1 and f"the export folder {folder} holds the checkpoint being exported ({folder})" in err
    assert _listing(folder) == SAFETENSORS


def test_a_killed_exports_staging_folder_is_not_in_the_way_and_is_cleared(students, tmp_path, capsys):
    a, _ = students
    out = tmp_path / "model"
    assert _export(capsys, a, "safetensors", out)[0] == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = out / f".mlkd-export-{int(dead.stdout)}"  # as an export killed with SIGKILL leaves it
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half a file")
    assert _export(capsys, a, "safetensors", out) == (0, "")
    assert _listing(out) == SAFETENSORS


def test_an_unreadable_export_record_needs_overwrite(students, tmp_path, capsys):
    a, _ = students
    out = tmp_path / "x"
    out.mkdir()
    (out / "export.json").write_text("[1, 2")
    rc, err = _export(capsys, a, "onnx", out)
    assert rc == 1 and f"{out} holds an export.json that is not an mlkd export record (JSONDecodeError: " in err
    assert _export(capsys, a, "safetensors", out, "--overwrite") == (0, "") and _listing(out) == SAFETENSORS


def test_the_library_takes_overwrite_the_same_way(students, tmp_path):
    a, b = students
    out = tmp_path / "lib"
    export_checkpoint(a, "safetensors", out)
    with pytest.raises(BadInput, match=f"already holds a safetensors export of {a}"):
        export_checkpoint(b, "safetensors", out)
    export_checkpoint(b, "safetensors", out, overwrite=True)
    assert _same_weights(out, b)
    with pytest.raises(BadInput, match=f"already holds a safetensors export of {b}, not of {a}"):
        export_model_dir(load_checkpoint(a), str(a), out)
    info, checks = export_model_dir(load_checkpoint(a), str(a), out, overwrite=True)
    assert info["format"] == "safetensors" and all(c.passed for c in checks) and _same_weights(out, a)
    assert _listing(out) == SAFETENSORS


# -- where the folder cannot be written ----------------------------------------------------------------------------
def test_out_that_is_a_file_is_refused_before_the_checkpoint_is_read(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"a file")
    rc, err = _export(capsys, tmp_path / "no_such.pt", "onnx", out)
    assert rc == 1
    assert err.strip() == (f"mlkd export: error: the export folder {out} is a file; an export writes a folder of "
                           "files: give the path of a folder (new, empty, or holding this checkpoint's export)")
    rc, err = _export(capsys, tmp_path / "no_such.pt", "onnx", out / "sub")
    assert rc == 1 and f"cannot create the export folder {out / 'sub'}: {out} is a file, not a folder" in err
    assert out.read_bytes() == b"a file"
    with pytest.raises(BadInput, match="is a file"):
        export_checkpoint(tmp_path / "no_such.pt", "safetensors", out)


def test_a_read_only_folder_is_a_cannot_write_before_any_work(students, tmp_path, capsys, monkeypatch):
    """Root writes into read-only folders, so the folder refuses through os.mkdir, as the kernel would."""
    a, _ = students
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.mkdir

    def read_only(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setattr("mlkd.export.exporter.load_checkpoint", lambda *a, **k: pytest.fail("read the checkpoint"))
    rc, err = _export(capsys, a, "safetensors", locked)
    assert rc == 1 and err.strip() == (f"mlkd export: error: cannot write the export into {locked}: Permission "
                                       "denied; choose a folder you can write to")
    rc, err = _export(capsys, a, "onnx", locked / "new")
    assert rc == 1 and f"cannot write the export into {locked / 'new'}: Permission denied" in err
    assert _listing(locked) == []
    with pytest.raises(CannotWrite, match=f"cannot write the export into {locked}"):
        export_checkpoint(a, "caffe", locked)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_cannot_write(students, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        rc, err = _export(capsys, students[0], "safetensors", locked)
    finally:
        locked.chmod(0o755)
    assert rc == 1 and f"cannot write the export into {locked}" in err and _listing(locked) == []


def test_a_write_that_fails_half_way_leaves_the_previous_export_and_nothing_partial(students, tmp_path):
    """A file-size limit (as a full disk) while writing the weights: exit 1 naming the file where it would have
    gone; a new folder is not left behind, and an export being overwritten stays as it was."""
    a, b = students
    old = tmp_path / "old"
    export_checkpoint(a, "safetensors", old)
    before = _snapshot(old)
    code = ("import resource, sys\nfrom mlkd.cli import main\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))\nsys.exit(main(sys.argv[1:]))\n")
    for out, extra in ((tmp_path / "new", ()), (old, ("--overwrite",))):
        proc = subprocess.run([sys.executable, "-c", code, "export", "--checkpoint", str(b), "--format",
                               "safetensors", "--out", str(out), *extra], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip() == (f"mlkd export: error: cannot write model weights {out / 'model.safetensors'}: "
                                       "File too large")
    assert _snapshot(old) == before and _same_weights(old, a)
    assert _listing(tmp_path) == ["old"]
