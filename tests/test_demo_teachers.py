"""`mlkd demo --teacher oicr` on a one-epoch copy of the demo's configs: the refined teacher and the students
distilled from it go to folders of their own (suffix _oicr), the student without distillation is the WSDDN run's,
reused and not retrained, and the summary, table and figure say which teacher they belong to."""

from __future__ import annotations

import json

import pytest

from mlkd.demo import run_demo
from mlkd.errors import BadInput
from mlkd.utils.config import CONFIG_DIR

ONE_EPOCH = {
    "teacher_demo": "optim: {epochs: 1, lr_steps: []}\nmodel: {hidden: 32, tiny_channels: [8, 16, 16, 16]}",
    "teacher_demo_oicr": "optim: {epochs: 1, lr_steps: []}\nmodel: {hidden: 32, tiny_channels: [8, 16, 16, 16]}",
    "student_demo": "stages: [{name: plain, epochs: 1, label_weight: 1.0}]",
    "student_demo_kd": "stages: [{name: joint, epochs: 1, label_weight: 1.0, soft_weight: 1.0, feature_weight: 5.0}]",
    "student_demo_kd_release": "stages: [{name: feature, epochs: 1, label_weight: 0.0, feature_weight: 1.0}, "
                               "{name: prediction, epochs: 1, label_weight: 1.0, soft_weight: 1.0}]",
}
SMALL_STUDENT = "model: {hidden: 32, tiny_channels: [8, 16, 16, 16]}\n"


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_configs")
    for name, text in ONE_EPOCH.items():
        small = SMALL_STUDENT if name.startswith("student") else ""
        (folder / f"{name}.yaml").write_text(f"base: {CONFIG_DIR / name}.yaml\n{text}\n{small}")
    return folder


def test_the_oicr_teacher_runs_beside_the_wsddn_one_and_shares_the_plain_student(configs, tmp_path):
    out = tmp_path / "demo"
    kw = dict(num_images=12, image_size=64, workers=0, configs=configs, progress=False)
    plain = run_demo(out, **kw)
    first = (out / "seed0" / "student" / "last.pt").stat().st_mtime_ns
    oicr = run_demo(out, teacher="oicr", **kw)
    seed = out / "seed0"
    assert (seed / "student" / "last.pt").stat().st_mtime_ns == first  # reused, not retrained
    for name in ("teacher_oicr", "student_kd_oicr", "student_kd_release_oicr"):
        assert (seed / name / "last.pt").is_file(), name
    assert not (seed / "student_oicr").exists()
    assert "refine: 3" in (seed / "teacher_oicr" / "config.yaml").read_text()
    assert (seed / "student_kd_oicr" / "config.yaml").read_text().count("teacher_oicr/last.pt") == 1
    assert {p.name for p in (seed / "reports").iterdir()} == {
        "teacher.json", "student.json", "student_kd.json", "student_kd_release.json", "teacher_oicr.json",
        "student_kd_oicr.json", "student_kd_release_oicr.json"}
    summary = json.loads((out / "summary_oicr.json").read_text())
    assert summary["teacher"] == "oicr" and summary["figure"].endswith("figure_oicr.png")
    assert (out / "figure_oicr.png").is_file() and json.loads((out / "summary.json").read_text())["teacher"] == "wsddn"
    assert oicr["table"].splitlines()[1].startswith("teacher + OICR (K=3)")
    assert plain["table"].splitlines()[1].startswith("teacher T-WDet")
    assert oicr["results"]["student"] == plain["results"]["student"]
    with pytest.raises(BadInput, match=r"the demo's teacher must be one of \['wsddn', 'oicr'\], got 'pcl'"):
        run_demo(out, teacher="pcl", **kw)
