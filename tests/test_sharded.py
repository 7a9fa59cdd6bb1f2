"""The passes over a dataset that run outside training, sharded over 2 gloo processes (torchrun): the teacher's
and the student's held-out predictions, the teacher's soft targets and its region feature store equal what one
process computes, and every rank gets the whole result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

import mlkd
from mlkd.distill.cache import compute_teacher_targets, teacher_features_store
from mlkd.inference.predict import predict_student, predict_teacher
from mlkd.models.build import model_from_checkpoint
from mlkd.proposals.attach import open_split
from mlkd.utils.checkpoint import load_checkpoint
from mlkd.utils.distributed import DistInfo

WORKER = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch

    from mlkd.utils.distributed import init_distributed
    from test_sharded import run_all

    info = init_distributed("cpu", timeout_min=5)
    out = Path(sys.argv[1])
    result = run_all(info, out, *sys.argv[2:])
    torch.save(result, out / f"rank{info.rank}.pt")
''')


def run_all(info: DistInfo, out: Path, teacher_path: str, student_path: str, train: str, train_props: str,
            val: str, val_props: str) -> dict:
    """Every sharded phase on the tiny fixtures; the results as plain tensors/arrays."""
    t_ckpt = load_checkpoint(teacher_path, "teacher")
    teacher, conv = model_from_checkpoint(t_ckpt), t_ckpt["input_convention"]
    student = model_from_checkpoint(load_checkpoint(student_path, "student"))
    cpu = torch.device("cpu")
    val_set = open_split(val, proposals=val_props)
    train_set = open_split(train, proposals=train_props)
    pred = predict_teacher(teacher, val_set, conv, cpu, (80,), flip=True, max_proposals=30, progress=False,
                           batch_size=2, info=info)
    scores = predict_student(student, val_set, "torchvision", 48, cpu, batch_size=3, progress=False, info=info)
    targets = compute_teacher_targets(teacher, conv, teacher_path, train_set, 80, out, info, 30, progress=False)
    features = {}
    with teacher_features_store(teacher, conv, teacher_path, train_set, 80, out, info, 30, ("fc7",), 5,
                                progress=False) as store:
        for r in train_set.records:
            for flip in (False, True):
                keep, f = store.get(r.image_id, flip)
                features[(r.image_id, flip)] = (keep.copy(), f["fc7"].astype(np.float32))
    return {"image_ids": pred["image_ids"], "image_scores": pred["image_scores"],
            "region_scores": pred["region_scores"], "student": scores, "targets": targets.probs,
            "features": features}


def test_two_gloo_processes_equal_one(trained, tmp_path):
    d = trained.data
    args = [str(trained.teacher), str(trained.student), str(d.train), str(d.train_proposals), str(d.val),
            str(d.val_proposals)]
    (tmp_path / "worker.py").write_text(WORKER)
    src = str(Path(mlkd.__file__).parents[1])
    paths = [src, str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    ddp_out = tmp_path / "ddp"
    ddp_out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(ddp_out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single = run_all(DistInfo(), tmp_path / "single", *args)
    assert sorted(p.name for p in (ddp_out / "teacher_features").iterdir()) == ["meta.json", "shard0", "shard1"]
    for rank in (0, 1):  # every rank has everything, equal to one process's results
        got = torch.load(ddp_out / f"rank{rank}.pt", weights_only=False)
        assert got["image_ids"] == single["image_ids"] and len(got["image_ids"]) == 4
        np.testing.assert_allclose(got["image_scores"], single["image_scores"], rtol=0, atol=1e-5)
        for a, b in zip(got["region_scores"], single["region_scores"]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["student"], single["student"], rtol=0, atol=1e-6)
        assert got["targets"].keys() == single["targets"].keys() and len(single["targets"]) == 12
        for k, v in single["targets"].items():
            torch.testing.assert_close(got["targets"][k], v, rtol=0, atol=1e-5)
        assert got["features"].keys() == single["features"].keys() and len(single["features"]) == 24
        for k, (keep, f) in single["features"].items():
            np.testing.assert_array_equal(got["features"][k][0], keep)
            np.testing.assert_allclose(got["features"][k][1], f, rtol=1e-3, atol=1e-3)  # float16 storage
    # one process's targets file equals the sharded run's: the cache a resumed single-process run would reuse
    a = torch.load(ddp_out / "teacher_targets.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "teacher_targets.pt", weights_only=True)
    assert a["key"] == b["key"] and list(a["probs"]) == list(b["probs"])


def test_predictions_do_not_depend_on_the_batch(trained):
    """Batched teacher passes (several images per forward) equal image-by-image ones."""
    ckpt = load_checkpoint(trained.teacher, "teacher")
    teacher = model_from_checkpoint(ckpt)
    val = open_split(str(trained.data.val), proposals=str(trained.data.val_proposals))
    one, four = (predict_teacher(teacher, val, ckpt["input_convention"], torch.device("cpu"), (80,), max_proposals=30,
                                 progress=False, batch_size=b) for b in (1, 4))
    np.testing.assert_allclose(one["image_scores"], four["image_scores"], rtol=0, atol=1e-5)
    assert one["image_scores"].shape == (4, len(val.classes))
