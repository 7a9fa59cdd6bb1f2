"""`mlkd import-caffe` on hostile input: NaN / inf weights, a prototxt nested too deeply, an existing --out, and a
write that fails half-way (nothing partial, no .tmp, the previous file intact)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mlkd.cli import main
from mlkd.errors import CannotWrite
from mlkd.export.caffe import LayerBlobs, read_caffemodel, write_caffemodel
from mlkd.export.caffe.importer import ImportOptions, ImportReport, check_outputs, write_reports
from mlkd.utils.checkpoint import load_checkpoint, make_checkpoint

# A VGG-style ImageNet classifier small enough to write in a test: 16 x 16 -> conv1_1 (4) -> pool -> conv2_1 (8) ->
# pool -> 8 x 4 x 4 -> fc6 (8) -> fc7 (8) -> fc8 (3).
SHAPES = {"conv1_1": (4, 3, 3, 3), "conv2_1": (8, 4, 3, 3), "fc6": (8, 128), "fc7": (8, 8), "fc8": (3, 8)}


def _prototxt() -> str:
    def layer(name: str, kind: str, bottom: str, extra: str = "") -> str:
        return f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{name}" {extra}}}\n'

    text = 'name: "tiny"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 ' \
           'dim: 16 dim: 16 } } }\n'
    bottom = "data"
    for b, conv in ((1, "conv1_1"), (2, "conv2_1")):
        text += layer(conv, "Convolution", bottom, "convolution_param { num_output: %d pad: 1 kernel_size: 3 } "
                      % SHAPES[conv][0])
        text += layer(f"pool{b}", "Pooling", conv, "pooling_param { pool: MAX kernel_size: 2 stride: 2 } ")
        bottom = f"pool{b}"
    for fc in ("fc6", "fc7", "fc8"):
        text += layer(fc, "InnerProduct", bottom, "inner_product_param { num_output: %d } " % SHAPES[fc][0])
        bottom = fc
    return text


def _weights() -> dict[str, LayerBlobs]:
    rng = np.random.default_rng(0)
    return {name: LayerBlobs("Convolution" if len(s) == 4 else "InnerProduct",
                             [rng.normal(scale=0.1, size=s).astype(np.float32),
                              rng.normal(scale=0.1, size=s[0]).astype(np.float32)]) for name, s in SHAPES.items()}


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "deploy.prototxt").write_text(_prototxt())
    write_caffemodel(tmp_path / "vgg.caffemodel", _weights())
    return tmp_path / "deploy.prototxt", tmp_path / "vgg.caffemodel"


def _import(prototxt, caffemodel, out, *extra: str) -> list[str]:
    return ["import-caffe", "--arch", "vgg16", "--prototxt", str(prototxt), "--caffemodel", str(caffemodel),
            "--out", str(out), *extra]


def test_the_fixture_imports(files, tmp_path, capsys):
    assert main(_import(*files, tmp_path / "w.pt")) == 0
    assert load_checkpoint(tmp_path / "w.pt")["kind"] == "imagenet_weights"


@pytest.mark.parametrize("layer, blob, role, value", [("fc7", 0, "weights", np.nan), ("conv2_1", 1, "bias", np.inf),
                                                      ("fc8", 1, "bias", -np.inf)])
def test_non_finite_weights_are_refused_naming_the_layer_and_blob(files, tmp_path, capsys, layer, blob, role, value):
    weights = _weights()
    weights[layer].blobs[blob].flat[2] = value
    write_caffemodel(tmp_path / "bad.caffemodel", weights)
    assert main(_import(files[0], tmp_path / "bad.caffemodel", tmp_path / "w.pt")) == 1
    err = capsys.readouterr().err
    assert f"bad.caffemodel: layer '{layer}' ({weights[layer].type}): blob {blob} ({role}, shape" in err
    assert "holds 1 non-finite values" in err and not (tmp_path / "w.pt").exists()
    with pytest.raises(ValueError, match=f"layer '{layer}'"):
        read_caffemodel(tmp_path / "bad.caffemodel")


def test_a_deeply_nested_prototxt_is_a_clear_error(files, tmp_path, capsys):
    deep = tmp_path / "deep.prototxt"
    deep.write_text('layer { name: "a" type: "ReLU" ' + "x { " * 5000 + "}" * 5000 + " }\n")
    assert main(_import(deep, files[1], tmp_path / "w.pt")) == 1
    assert f"{deep} is not a valid Caffe prototxt: its {{ }} blocks are nested too deeply" in capsys.readouterr().err


def test_an_existing_out_is_refused_unless_overwrite(files, tmp_path, capsys):
    out = tmp_path / "w.pt"
    out.write_bytes(b"precious")
    assert main(_import(*files, out)) == 1
    assert f"{out} already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(_import(*files, out, "--overwrite")) == 0
    assert load_checkpoint(out)["kind"] == "imagenet_weights"
    assert main(_import(*files, tmp_path, "--overwrite")) == 1
    assert f"{tmp_path} is a folder; give the path of the .pt file to write" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--out and --teacher-out are the same file"):
        check_outputs(tmp_path / "s.pt", ImportOptions(teacher_out=tmp_path / "." / "s.pt", overwrite=True))


def test_a_write_that_fails_half_way_leaves_nothing(files, tmp_path):
    """A file-size limit (as a full disk) while writing: exit 1 with a one-line CannotWrite naming the file; no new
    file, no .tmp, and with --overwrite the previous file intact."""
    old = tmp_path / "old.pt"
    assert main(_import(*files, old)) == 0
    before = old.read_bytes()
    code = ("import resource, sys\nfrom mlkd.cli import main\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\nsys.exit(main(sys.argv[1:]))\n")
    for out, extra in ((tmp_path / "new.pt", ()), (old, ("--overwrite",))):
        proc = subprocess.run([sys.executable, "-c", code, *_import(*files, out, *extra)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip() == f"mlkd import-caffe: error: cannot write checkpoint {out}: File too large"
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.prototxt", "old.pt", "vgg.caffemodel"]


def test_when_one_output_cannot_be_written_the_others_are_removed(tmp_path):
    ckpt = make_checkpoint("imagenet_weights", {"w": torch.ones(2)}, input_convention="caffe")
    (tmp_path / "plain").write_text("x")
    reports = [ImportReport(tmp_path / p, "imagenet_weights", {}, [], checkpoint=ckpt)
               for p in ("student.pt", "plain/teacher.pt")]
    with pytest.raises(CannotWrite, match="plain is a file, not a folder"):
        write_reports(reports)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
