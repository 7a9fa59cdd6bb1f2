"""The exact speed-ups of a training step (issue 13) compute what the plain paths compute.

- mlkd's optimizer uses PyTorch's fused SGD / AdamW kernel: the updates are checked against the per-parameter
  loop (equal up to the last bit of an occasional element: the fused kernel rounds a multiply-add once), and a
  resumed optimizer keeps the kernel it was built with.
- VGG16 runs its first two blocks channels_last on the CPU: outputs and gradients are checked against the same
  layers run in one layout.
- The command line keeps freed memory for reuse: the setting is checked to take and to be switchable off.
"""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch
from torch import nn

from mlkd.models.backbones import ConvBackbone, tiny, vgg16
from mlkd.training.optim import build_optimizer, param_groups, restore_optimizer
from mlkd.utils import device as dev


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_updates_equal_the_per_parameter_loop(name):
    fused_net, loop_net = _net(), _net()
    fused = build_optimizer(param_groups(fused_net, 0.05, 5e-4), name, 0.05, 0.9)
    groups = param_groups(loop_net, 0.05, 5e-4)
    loop = torch.optim.SGD(groups, lr=0.05, momentum=0.9, foreach=False) if name == "sgd" else \
        torch.optim.AdamW(groups, lr=0.05, foreach=False)
    assert all(g["fused"] for g in fused.param_groups)
    initial = [p.detach().clone() for p in loop_net.parameters()]
    assert len({g["weight_decay"] for g in fused.param_groups}) == 2  # weights decay, biases do not
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(3, 3, 8, 8, generator=gen)
        for net, opt in ((fused_net, fused), (loop_net, loop)):
            net(x).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b, before in zip(fused_net.parameters(), loop_net.parameters(), initial):
        assert not torch.equal(b, before)  # the steps moved every parameter
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resumed_optimizer_keeps_the_kernel_it_was_built_with():
    net = _net()
    old_style = torch.optim.SGD(param_groups(net, 0.1, 5e-4), lr=0.1, momentum=0.9)  # fused=None in its state
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    old_style.step()
    state = old_style.state_dict()
    assert state["param_groups"][0]["fused"] is None
    fresh = build_optimizer(param_groups(net, 0.1, 5e-4), "sgd", 0.1, 0.9)
    restore_optimizer(fresh, state)
    assert all(g["fused"] is True for g in fresh.param_groups)
    first = next(iter(fresh.state.values()))["momentum_buffer"]
    assert torch.equal(first, next(iter(old_style.state.values()))["momentum_buffer"])


def test_parameters_that_cannot_be_fused_fall_back_to_pytorchs_choice():
    groups = [{"params": [nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(2))]}]
    assert build_optimizer(groups, "sgd", 0.1).param_groups[0]["fused"] is True  # float64 is fusable
    meta = [{"params": [nn.Parameter(torch.zeros(3, device="meta"))]}]
    assert build_optimizer(meta, "sgd", 0.1).param_groups[0]["fused"] is None


def _plain(backbone: ConvBackbone) -> ConvBackbone:
    backbone.layout_switch = None
    return backbone


@pytest.mark.parametrize("batch,size", [(1, 64), (2, 48)])
def test_vgg16_mixed_layout_equals_one_layout(batch, size):
    torch.manual_seed(0)
    mixed = vgg16()
    plain = _plain(vgg16())
    plain.load_state_dict(mixed.state_dict())
    assert mixed.layout_switch == 9  # conv1_1 .. relu2_2 channels_last, pool2 onwards the default layout
    x = torch.randn(batch, 3, size, size)
    seen = {}  # the layout each layer hands on: conv1_1 .. relu2_2 channels_last, pool2 the default layout
    for i in (0, 8, 9):
        mixed.features[i].register_forward_hook(lambda m, args, out, i=i: seen.setdefault(i, out))
    y_mixed, y_plain = mixed(x), plain(x)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert seen[8].is_contiguous(memory_format=torch.channels_last) and not seen[8].is_contiguous()
    assert seen[9].is_contiguous()
    assert y_mixed.is_contiguous() and y_mixed.shape == (batch, 512, size // 16, size // 16)
    torch.testing.assert_close(y_mixed, y_plain, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_plain)
    y_mixed.backward(g)
    y_plain.backward(g)
    for (name, a), b in zip(mixed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * float(b.grad.abs().max()), msg=name)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_an_input_already_channels_last_keeps_that_layout_and_tracing_sees_the_plain_stack():
    torch.manual_seed(0)
    backbone = vgg16().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = _plain(vgg16()).eval()
        ref.load_state_dict(backbone.state_dict())
        whole = backbone(x.contiguous(memory_format=torch.channels_last))
        assert whole.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(whole, ref(x), rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(backbone, x)
    kinds = {n.kind() for n in traced.graph.nodes()}
    assert "aten::contiguous" not in kinds


def test_layout_switch_is_only_where_asked():
    assert tiny().layout_switch is None
    assert ConvBackbone(tiny().features, 64, 8, cpu_channels_last_blocks=1).layout_switch == 2
    assert ConvBackbone(tiny().features, 64, 8, cpu_channels_last_blocks=9).layout_switch is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux only")
def test_keep_freed_memory_takes_and_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(dev.KEEP_MEMORY_ENV, "0")
    assert dev.keep_freed_memory() is False
    monkeypatch.delenv(dev.KEEP_MEMORY_ENV)
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert dev.keep_freed_memory() is True


def test_the_fp16_loss_scaling_path_gives_the_plain_paths_weights():
    """What run.amp=fp16 adds on a GPU, run on the CPU with torch.amp.GradScaler("cpu"): the loss scaled by a power
    of two, the gradients unscaled before clipping, the step through the scaler. Scaling by 2**k is exact in float32,
    so the weights equal the unscaled path's bit for bit; clipping before the unscale would not."""
    from mlkd.training.loop import LoopSettings, StageParts, train_one_epoch

    torch.manual_seed(0)
    data = [(torch.randn(4, 6), [{"y": torch.randn(4, 2)}]) for _ in range(3)]

    def run(scaler):
        torch.manual_seed(1)
        model = torch.nn.Linear(6, 2)
        objective = _Regression(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        parts = StageParts(objective, 0.5, optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, []), data,
                           lambda x, t: {"x": x, "y": t[0]["y"]})
        train_one_epoch(objective, parts, 0, LoopSettings(clip_grad=0.05, progress=False), torch.device("cpu"),
                        scaler=scaler)
        return model.state_dict()

    plain, scaled = run(None), run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    assert all(torch.equal(plain[k], scaled[k]) for k in plain)


class _Regression(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.model(x) - y).pow(2).mean() * 100}  # large gradients: the clipping bites


def test_the_distinct_region_path_synchronises_with_the_host_once(monkeypatch):
    """On a GPU every data-dependent size costs a host synchronisation. The distinct-region fc6 has one, documented
    in distinct_rows: torch.unique (the number of distinct rows sizes its output). Counted on the CPU by wrapping
    every call that would synchronise."""
    from mlkd.models.wsddn import WSDDN

    counts: dict[str, int] = {}

    def counting(name, real):
        def wrapped(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        return wrapped

    torch.manual_seed(0)
    model = WSDDN(tiny((4, 8, 8), 1), 3, hidden=16, roi_size=2, dropout=0.0).train()
    fmap = model.backbone(torch.randn(1, 3, 64, 64))
    boxes = torch.tensor([[0, 0, 30, 30], [1, 1, 31, 31], [10, 10, 60, 50], [0, 0, 64, 64]], dtype=torch.float32)
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu", "numpy"):  # len(): a shape
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "unique", counting("unique", torch.unique))
    monkeypatch.setattr(torch, "nonzero", counting("nonzero", torch.nonzero))
    model.region_layers(fmap, boxes, torch.ones(4), torch.zeros(4, dtype=torch.int64))
    assert counts == {"unique": 1}, counts
