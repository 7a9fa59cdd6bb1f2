"""Speed-only choices timed once per machine and remembered (mlkd.utils.autotune): the faster candidate wins, the
decision is kept in the cache file and reused without timing, MLKD_AUTOTUNE=0 gives the fixed default, and the
models' timed choices (the VGG stack's layout, the teacher's distinct-region fc6) change no value beyond float
rounding, no gradient and no random number."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mlkd.models.backbones import ConvBackbone, tiny
from mlkd.models.wsddn import WSDDN
from mlkd.utils import autotune


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Timing on, with an empty cache of its own."""
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "_memory", {})
    return tmp_path / "cache" / autotune.FILE


def counting(calls: dict[str, int], name: str, seconds: float):
    def run() -> None:
        calls[name] = calls.get(name, 0) + 1
        time.sleep(seconds)
    return run


def test_the_faster_candidate_is_chosen_remembered_and_reused_without_timing(tuning):
    calls: dict[str, int] = {}
    candidates = {"slow": counting(calls, "slow", 0.03), "fast": counting(calls, "fast", 0.0)}
    cpu = torch.device("cpu")
    assert autotune.fastest("demo decision", "shape A", candidates, "slow", cpu) == "fast"
    assert calls == {"slow": 3, "fast": 3}  # a warm-up and two timed runs each
    key = f"{autotune.machine_key(cpu)} | demo decision | shape A"
    assert json.loads(tuning.read_text()) == {key: "fast"}
    autotune._memory.clear()  # a new process: the file decides, nothing is timed
    assert autotune.fastest("demo decision", "shape A", candidates, "slow", cpu) == "fast"
    assert calls == {"slow": 3, "fast": 3}
    assert autotune.fastest("demo decision", "shape B", candidates, "slow", cpu) == "fast"  # another shape: timed
    assert calls == {"slow": 6, "fast": 6} and len(json.loads(tuning.read_text())) == 2


def test_timing_off_gives_the_default_and_times_nothing(tuning, monkeypatch):
    monkeypatch.setenv(autotune.ENV, "0")
    calls: dict[str, int] = {}
    candidates = {"slow": counting(calls, "slow", 0.03), "fast": counting(calls, "fast", 0.0)}
    assert autotune.fastest("demo decision", "shape A", candidates, "slow", torch.device("cpu")) == "slow"
    assert calls == {} and not tuning.exists()
    with pytest.raises(ValueError, match="the default 'medium' is not a candidate"):
        autotune.fastest("demo decision", "shape A", candidates, "medium", torch.device("cpu"))


def test_an_unreadable_cache_file_is_timed_again_and_rewritten(tuning, caplog):
    tuning.parent.mkdir(parents=True)
    tuning.write_text("{not json")
    calls: dict[str, int] = {}
    candidates = {"slow": counting(calls, "slow", 0.03), "fast": counting(calls, "fast", 0.0)}
    assert autotune.fastest("demo decision", "shape A", candidates, "slow", torch.device("cpu")) == "fast"
    assert "ignoring the unreadable" in caplog.text and len(json.loads(tuning.read_text())) == 1


def test_the_layout_choice_changes_no_value_and_no_gradient(tuning, monkeypatch):
    """Timing the stack's two layouts inside its forward leaves the parameters' .grad alone; either layout gives
    the plain stack's values up to float rounding."""
    torch.manual_seed(0)
    stack = tiny((8, 16, 16), 1)
    backbone = ConvBackbone(stack.features, 16, 4, cpu_channels_last_blocks=1)
    x = torch.randn(2, 3, 48, 48)
    reference = stack.features(x)
    out = backbone(x)  # timed here (training: forward and backward of both layouts), then run
    assert all(p.grad is None for p in backbone.parameters())
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    decisions = json.loads(tuning.read_text())
    assert len(decisions) == 1 and "conv 8-16-16 layout" in next(iter(decisions))
    for choice in ("channels_last", "default"):
        monkeypatch.setattr(autotune, "_memory", {k: choice for k in decisions})
        torch.testing.assert_close(backbone(x), reference, rtol=1e-5, atol=1e-5)


def test_the_distinct_region_choice_changes_no_value_gradient_or_random_number(tuning):
    """A training forward with the choice timed equals one with the fixed default: the timing ran no dropout (the
    random stream is where it was) and accumulated no gradient."""
    torch.manual_seed(0)
    model = WSDDN(tiny((4, 8, 8), 1), 3, hidden=16, roi_size=2, dropout=0.5).double().train()
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    boxes = torch.tensor([[0, 0, 30, 30], [1, 1, 31, 31], [10, 10, 60, 50], [0, 0, 64, 64]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)

    def loss() -> torch.Tensor:
        torch.manual_seed(7)
        return model(images, [boxes], None, labels)["loss_cls"]

    timed = loss()
    assert all(p.grad is None for p in model.parameters())
    decisions = json.loads(tuning.read_text())
    assert any("wsddn fc6" in k for k in decisions)
    for choice in ("distinct", "per-region"):
        autotune._memory.update({k: choice for k in decisions if "wsddn fc6" in k})
        assert loss().item() == pytest.approx(timed.item(), rel=1e-12)
