"""Packaging: the wheel carries the configs, the Caffe schema and the licence, and works outside the source tree;
optional dependencies are extras whose absence is a clear error naming the extra."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = dist.glob("mlkd-*.whl")
    return built


def test_the_wheel_holds_the_configs_the_caffe_schema_and_the_licence(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (ROOT / "src" / "mlkd" / "configs").glob("*.yaml"))
    assert sorted(Path(n).name for n in names if n.startswith("mlkd/configs/")) == shipped and len(shipped) >= 15
    assert "mlkd/export/caffe/caffe.proto" in names and "mlkd/py.typed" not in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_a_fresh_venv_with_only_the_wheel_runs_the_cli_and_loads_packaged_configs(wheel, tmp_path):
    """mlkd comes only from the wheel; its dependencies are borrowed from this environment through a path
    entry (site-packages listed in a .pth, so this environment's own editable install of mlkd stays out)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--quiet", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    helped = subprocess.run([str(venv / "bin" / "mlkd"), "demo", "--help"], cwd=work, capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "--seeds" in helped.stdout, helped.stderr
    code = ("import mlkd; from mlkd.utils.config import load_config, packaged_configs; "
            "from mlkd.training.teacher import TeacherConfig; from mlkd.demo import find_configs; "
            "cfg = load_config(TeacherConfig, 'teacher_coco'); "
            "print(mlkd.__file__, len(packaged_configs()), cfg.data.test_scale, find_configs(None))")
    proc = subprocess.run([str(python), "-c", code], cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    where, count, scale, configs = proc.stdout.split()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT)
    shipped = len(list((ROOT / "src" / "mlkd" / "configs").glob("*.yaml")))
    assert (count, scale) == (str(shipped), "672") and Path(configs).is_relative_to(venv)


def _without(modules: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter in which importing ``modules`` fails, as if they were not installed."""
    code = (f"import sys\nfor m in {modules!r}: sys.modules[m] = None\n"
            f"from mlkd.cli import main\nsys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_missing_extras_are_clear_errors_and_do_not_break_the_rest(trained, tmp_path):
    no_protobuf = ["google.protobuf", "google.protobuf.message", "google.protobuf.text_format"]
    proc = _without(no_protobuf, ["export", "--checkpoint", str(trained.student), "--format", "caffe", "--out",
                                  str(tmp_path / "c")], tmp_path)
    assert proc.returncode == 1 and "Caffe export needs protobuf: pip install 'mlkd[caffe]'" in proc.stderr, proc.stderr
    proc = _without(no_protobuf, ["export", "--checkpoint", str(trained.student), "--format", "safetensors", "--out",
                                  str(tmp_path / "s")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = _without(["onnx", "onnxruntime"], ["export", "--checkpoint", str(trained.student), "--format", "onnx",
                                              "--out", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 1 and "pip install 'mlkd[export]'" in proc.stderr, proc.stderr
    (tmp_path / "p.mat").write_bytes(b"")
    proc = _without(["scipy", "scipy.io"], ["proposals", "import", "--format", "mat", "--file", str(tmp_path / "p.mat"),
                                            "--dataset", str(trained.data.train), "--out", str(tmp_path / "m")],
                    tmp_path)
    assert proc.returncode == 1 and "reading or writing .mat proposal files needs scipy: pip install 'mlkd[mat]'" in proc.stderr, \
        proc.stderr
    proc = _without(["torch.utils.tensorboard"], ["train-teacher", "--config", "teacher_demo", "--set",
                                                  "run.tensorboard=true", "--set", f"run.out={tmp_path / 't'}",
                                                  "--set", f"data.train={trained.data.train}", "--set",
                                                  f"data.train_proposals={trained.data.train_proposals}"], tmp_path)
    assert proc.returncode == 1 and "needs tensorboard: pip install 'mlkd[tensorboard]'" in proc.stderr, proc.stderr
