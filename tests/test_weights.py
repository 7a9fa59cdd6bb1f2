"""Pretrained weights from local caches (``model.weights: torchvision:<WEIGHTS>`` / ``timm:<arch>.<tag>``): each
found in a fake cache made here (TORCH_HOME, HF_HOME) under the exact name torchvision / timm download it to,
loaded into the model; a missing file is an error naming the file and how to get it. Nothing touches the network:
downloads are refused (HF_HUB_OFFLINE) and the opt-in download is replaced by a fake."""

from __future__ import annotations

import dataclasses

import safetensors.torch
import pytest
import torch
import torchvision

from mlkd.errors import BadInput, NotFound
from mlkd.models import weights as weights_module
from mlkd.models.build import build_student, build_teacher
from mlkd.models.configs import StudentModelConfig, TeacherModelConfig
from mlkd.models.weights import resolve_weights

torch.set_num_threads(1)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches in ``tmp_path``; downloads off."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "MLKD_DOWNLOAD_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


# -- torchvision ---------------------------------------------------------------------------------------------
def test_torchvision_weights_load_from_the_torch_hub_cache(caches):
    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()  # random, in torchvision's layout
    path = caches / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"  # where torchvision downloads V1
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    cfg = StudentModelConfig(backbone="resnet50", weights="torchvision:IMAGENET1K_V1", input_convention="torchvision")
    model = build_student(cfg, 3)
    own = model.state_dict()
    assert all(torch.equal(own[f"backbone.{k}"], v) for k, v in state.items() if not k.startswith("fc."))


def test_missing_torchvision_weights_name_the_file_and_how_to_get_it(caches):
    with pytest.raises(NotFound) as e:
        resolve_weights("torchvision:IMAGENET1K_V1", "vgg16", "torchvision")
    expected = caches / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert f"model.weights torchvision:IMAGENET1K_V1: {expected} is not there" in str(e.value)
    assert "rerun with MLKD_DOWNLOAD_WEIGHTS=1 in the environment, or run python -c \"import torchvision; " \
           "torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict()\"" in str(e.value)
    with pytest.raises(NotFound, match="vgg16-397923af.pth is not there"):  # the teacher reads the same cache
        build_teacher(TeacherModelConfig(weights="torchvision:IMAGENET1K_V1", input_convention="torchvision"), 3)


def test_torchvision_weights_errors_name_the_bad_value(caches):
    with pytest.raises(BadInput, match=r"ResNet50_Weights has \['IMAGENET1K_V1', 'IMAGENET1K_V2'\] \(or DEFAULT\)"):
        resolve_weights("torchvision:IMAGENET_V1", "resnet50", "torchvision")
    with pytest.raises(BadInput, match=r"expect input convention 'torchvision' .* configured for 'caffe' \(set "
                                       r"model.input_convention=torchvision\)"):
        resolve_weights("torchvision:IMAGENET1K_V2", "resnet50", "caffe")
    with pytest.raises(BadInput, match=r"IMAGENET1K_FEATURES expect RGB 0-1 input with mean \(0.48235"):
        resolve_weights("torchvision:IMAGENET1K_FEATURES", "vgg16", "caffe")  # Caffe's VGG16 in RGB: no named one
    with pytest.raises(BadInput, match=r"torchvision weights exist for the backbones .* not 'timm/resnet50' \(a timm "
                                       r"backbone takes timm:<arch>.<tag>\)"):
        resolve_weights("torchvision:IMAGENET1K_V1", "timm/resnet50", "torchvision")


def test_opt_in_download_fetches_into_the_cache(caches, monkeypatch):
    calls = []

    def fake_download(url, path):  # what torch.hub would do, without the network
        calls.append(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
        return path

    monkeypatch.setattr(weights_module, "_download_url", fake_download)
    with pytest.raises(NotFound):
        resolve_weights("torchvision:IMAGENET1K_V2", "resnet50", "torchvision")
    monkeypatch.setenv("MLKD_DOWNLOAD_WEIGHTS", "1")
    found = resolve_weights("torchvision:IMAGENET1K_V2", "resnet50", "torchvision")
    assert calls == [torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url]
    assert found.path == caches / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth" and found.path.is_file()


# -- timm ------------------------------------------------------------------------------------------------------
@pytest.fixture
def timm():
    return pytest.importorskip("timm")


def _hf_file(caches, repo: str, file: str, state: dict[str, torch.Tensor]):
    """``file`` of the hub repository ``repo`` in the Hugging Face cache layout (refs/main -> snapshots/<commit>)."""
    repo_dir = caches / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0123456789abcdef")
    path = repo_dir / "snapshots" / "0123456789abcdef" / file
    path.parent.mkdir(parents=True)
    if file.endswith(".safetensors"):
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _same_tensors(backbone: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Every tensor of the timm feature extractor equals the file's of the same name (timm's feature wrappers
    write ``stages.0`` as ``stages_0`` and put a ViT under ``model.``)."""
    file = {k.replace("_", "."): v for k, v in state.items()}
    own = {k.removeprefix("model.").replace("_", "."): v for k, v in backbone.features.state_dict().items()}
    return bool(own) and all(torch.equal(v, file[k]) for k, v in own.items())


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_timm_weights_load_from_the_hugging_face_cache(caches, timm, file):
    torch.manual_seed(0)
    state = timm.create_model("test_resnet.r160_in1k").state_dict()
    _hf_file(caches, "timm/test_resnet.r160_in1k", file, state)
    cfg = StudentModelConfig(backbone="timm/test_resnet", weights="timm:test_resnet.r160_in1k",
                             input_convention="inception", image_size=64, hidden=8)
    assert _same_tensors(build_student(cfg, 3).backbone, state)


def test_timm_vit_weights_are_adapted_to_the_students_image_size(caches, timm):
    """test_vit's weights are for 160 px (10 x 10 patches): at 64 px timm resamples the position embeddings."""
    torch.manual_seed(0)
    state = timm.create_model("test_vit.r160_in1k").state_dict()
    path = _hf_file(caches, "timm/test_vit.r160_in1k", "model.safetensors", state)
    cfg = StudentModelConfig(backbone="timm/test_vit", weights="timm:test_vit.r160_in1k", input_convention="inception",
                             image_size=64, hidden=8)
    vit = build_student(cfg, 3).backbone.features.model
    assert torch.equal(vit.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert vit.pos_embed.shape[1] == vit.num_prefix_tokens + 16 and state["pos_embed"].shape[1] == 1 + 100
    local = build_student(dataclasses.replace(cfg, weights=str(path)), 3).backbone.features.model
    assert torch.equal(local.pos_embed, vit.pos_embed)  # the same file given as a local path


def test_missing_timm_weights_name_the_cache_entry_and_how_to_get_it(caches, timm):
    with pytest.raises(NotFound) as e:
        resolve_weights("timm:test_convnext.r160_in1k", "timm/test_convnext", "inception")
    entry = caches / "hf" / "hub" / "models--timm--test_convnext.r160_in1k" / "snapshots" / "<revision>"
    assert f"model.weights timm:test_convnext.r160_in1k: {entry / 'model.safetensors'} is not there" in str(e.value)
    assert "MLKD_DOWNLOAD_WEIGHTS=1" in str(e.value)
    assert "python -c \"import timm; timm.create_model('test_convnext.r160_in1k', pretrained=True)\"" in str(e.value)


def test_timm_weights_errors_name_the_bad_value(caches, timm):
    with pytest.raises(BadInput, match=r"timm has no pretrained weights 'test_resnet.nope'; test_resnet has "
                                       r"\['test_resnet.r160_in1k'\]"):
        resolve_weights("timm:test_resnet.nope", "timm/test_resnet", "inception")
    with pytest.raises(BadInput, match=r"timm:resnet50.a1_in1k are weights of the backbone timm/resnet50; "
                                       r"model.backbone is 'timm/convnext_tiny'"):
        resolve_weights("timm:resnet50.a1_in1k", "timm/convnext_tiny", "torchvision")
    with pytest.raises(BadInput, match=r"expect input convention 'inception' \(mean \(0.5, 0.5, 0.5\), std "
                                       r"\(0.5, 0.5, 0.5\)\), but the model is configured for 'torchvision'"):
        build_student(StudentModelConfig(backbone="timm/test_vit", weights="timm:test_vit.r160_in1k",
                                         input_convention="torchvision"), 3)
