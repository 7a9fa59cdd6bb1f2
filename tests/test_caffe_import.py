"""`mlkd import-caffe`: random-weight VGG-style Caffe models written in the release's layouts (V1 and V2) imported
through the command and compared with OpenCV's DNN module running the same files; the real VGG16 name mapping on
shapes alone; the teacher and student networks of the release (fork layers, KD teacher copy); clear errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from mlkd.cli import main
from mlkd.export.caffe import CaffeNet, LayerBlobs, read_prototxt, write_caffemodel
from mlkd.export.caffe.importer import plan_imagenet, plan_student, plan_teacher
from mlkd.models.backbones import load_imagenet_weights, read_state_dict, tiny
from mlkd.models.build import VGG16_IMAGENET, build_student, build_teacher, model_from_checkpoint
from mlkd.models.configs import StudentModelConfig, TeacherModelConfig
from mlkd.models.student import Student
from mlkd.utils.checkpoint import load_checkpoint

cv2.setNumThreads(1)
torch.set_num_threads(1)
V1_TYPES = {"Convolution": "CONVOLUTION", "ReLU": "RELU", "Pooling": "POOLING", "InnerProduct": "INNER_PRODUCT",
            "Dropout": "DROPOUT", "Softmax": "SOFTMAX", "Sigmoid": "SIGMOID"}
TOLERANCE = 1e-4  # relative to max(1, max |output|), as mlkd export checks


# -- writing Caffe files the way the release does --------------------------------------------------------
def _layer(version: int, name: str, kind: str, bottoms: str | list[str], top: str, extra: str = "") -> str:
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    if version == 1:
        return f'layers {{ {b} top: "{top}" name: "{name}" type: {V1_TYPES[kind]} {extra}}}\n'
    return f'layer {{ name: "{name}" type: "{kind}" {b} top: "{top}" {extra}}}\n'


def _input(version: int, name: str, shape: tuple[int, ...]) -> str:
    if version == 1:
        return f'input: "{name}"\n' + "".join(f"input_dim: {d}\n" for d in shape)
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


def _convs(version: int, blocks, bottom: str, last_pool: bool, conv="conv{b}_{i}", pool="pool{b}") -> tuple[str, str]:
    """VGG blocks as text: conv + in-place ReLU, a 2x2 max pool after each block (and the last with last_pool)."""
    text = ""
    for b, (channels, n) in enumerate(blocks, 1):
        for i in range(1, n + 1):
            name = conv.format(b=b, i=i)
            text += _layer(version, name, "Convolution", bottom, name,
                           f"convolution_param {{ num_output: {channels} pad: 1 kernel_size: 3 }} ")
            text += _layer(version, f"relu{b}_{i}", "ReLU", name, name)
            bottom = name
        if b < len(blocks) or last_pool:
            name = pool.format(b=b)
            text += _layer(version, name, "Pooling", bottom, name,
                           "pooling_param { pool: MAX kernel_size: 2 stride: 2 } ")
            bottom = name
    return text, bottom


def _fcs(version: int, fcs, bottom: str) -> str:
    """InnerProduct layers in a chain; ReLU + Dropout after all but the last."""
    text = ""
    for j, (name, out) in enumerate(fcs):
        text += _layer(version, name, "InnerProduct", bottom, name, f"inner_product_param {{ num_output: {out} }} ")
        if j < len(fcs) - 1:
            n = name[-1]
            text += _layer(version, f"relu{n}", "ReLU", name, name)
            text += _layer(version, f"drop{n}", "Dropout", name, name, "dropout_param { dropout_ratio: 0.5 } ")
        bottom = name
    return text


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, LayerBlobs]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in shapes.items():
        gain = 0.002 if name.startswith(("fc8", "fc_wsd_8")) else 2.0  # He init; small classifiers: no saturation
        weight = (rng.normal(size=s) * np.sqrt(gain / np.prod(s[1:]))).astype(np.float32)
        out[name] = LayerBlobs("Convolution" if len(s) == 4 else "InnerProduct",
                               [weight, rng.normal(scale=0.1, size=s[0]).astype(np.float32)])
    return out


def _conv_shapes(blocks, conv="conv{b}_{i}") -> dict[str, tuple[int, ...]]:
    shapes, c_in = {}, 3
    for b, (channels, n) in enumerate(blocks, 1):
        for i in range(1, n + 1):
            shapes[conv.format(b=b, i=i)] = (channels, c_in, 3, 3)
            c_in = channels
    return shapes


def _opencv(prototxt, caffemodel, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    for name, x in inputs.items():
        net.setInput(x, name)
    return list(net.forward(outputs))


def _close(name: str, got: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.detach().numpy()
    diff, scale = float(np.abs(got.reshape(ref.shape) - ref).max()), max(1.0, float(np.abs(ref).max()))
    print(f"{name}: max |OpenCV - PyTorch| = {diff:.2e} (allowed {TOLERANCE * scale:.1e})")
    assert got.size == ref.size and diff <= TOLERANCE * scale


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    with capsys.disabled():  # the import report, also under pytest -s
        print(out, end="")
    return rc, out, err


def _import(tmp_path, capsys, arch: str, prototxt, caffemodel, *extra: str) -> tuple[int, str, str]:
    return _run(["import-caffe", "--arch", arch, "--prototxt", str(prototxt), "--caffemodel", str(caffemodel),
                 "--out", str(tmp_path / f"{arch}.pt"), *extra], capsys)


# -- ImageNet VGG: V1 and V2 ---------------------------------------------------------------------------------
IMAGENET_BLOCKS = ((8, 2), (16, 2))  # conv1_1 conv1_2 pool1 conv2_1 conv2_2 pool2; 32 x 32 -> 16 x 8 x 8


def _imagenet_files(tmp_path, version: int):
    text = 'name: "VGG_tiny"\n' + _input(version, "data", (1, 3, 32, 32))
    convs, top = _convs(version, IMAGENET_BLOCKS, "data", last_pool=True)
    text += convs + _fcs(version, [("fc6", 32), ("fc7", 32), ("fc8", 10)], top)
    text += _layer(version, "prob", "Softmax", "fc8", "prob")
    (tmp_path / "deploy.prototxt").write_text(text)
    shapes = {**_conv_shapes(IMAGENET_BLOCKS), "fc6": (32, 16 * 8 * 8), "fc7": (32, 32), "fc8": (10, 32)}
    write_caffemodel(tmp_path / "vgg.caffemodel", _random_weights(shapes), version=version)
    return tmp_path / "deploy.prototxt", tmp_path / "vgg.caffemodel"


class TorchvisionLayoutVGG(nn.Module):
    """torchvision's VGG module layout (features, classifier.0/3/6) for the tiny IMAGENET_BLOCKS network."""

    def __init__(self) -> None:
        super().__init__()
        layers, c_in = [], 3
        for channels, n in IMAGENET_BLOCKS:
            for _ in range(n):
                layers += [nn.Conv2d(c_in, channels, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = channels
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(1024, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                                        nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@pytest.mark.parametrize("version", [1, 2])
def test_imagenet_vgg_import_matches_opencv_and_records_caffe_convention(tmp_path, capsys, version):
    prototxt, caffemodel = _imagenet_files(tmp_path, version)
    rc, out, err = _import(tmp_path, capsys, "vgg16", prototxt, caffemodel)
    assert rc == 0, err
    assert "imported 7 Caffe layers: conv1_1 conv1_2 conv2_1 conv2_2 fc6 fc7 fc8" in out
    path = tmp_path / "vgg16.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["input_convention"] == "caffe" and raw["kind"] == "imagenet_weights"
    state = read_state_dict(path, convention="caffe")
    assert sorted(state) == sorted(TorchvisionLayoutVGG().state_dict())  # features.0/2/5/7, classifier.0/3/6
    with pytest.raises(ValueError, match="input convention 'caffe', but the model is configured for 'torchvision'"):
        read_state_dict(path, convention="torchvision")

    # usable as model.weights: the teacher's / student's VGG16_IMAGENET mapping takes it (here on a tiny backbone
    # of the same layout: features without pool5, fc6 over the 8 x 8 pool5 grid)
    student = Student(tiny((8, 16), convs_per_block=2), 4, hidden=32, roi_size=8)
    loaded = load_imagenet_weights(student, path, VGG16_IMAGENET, convention="caffe")
    assert len(loaded) == 12 and torch.equal(student.fc7.weight, state["classifier.3.weight"])

    model = TorchvisionLayoutVGG().eval()
    model.load_state_dict(state)
    x = torch.from_numpy(np.random.default_rng(1).uniform(-120, 150, (2, 3, 32, 32)).astype(np.float32))
    logits, prob = _opencv(prototxt, caffemodel, {"data": x.numpy()}, ["fc8", "prob"])
    with torch.no_grad():
        ref = model(x)
    _close(f"V{version} fc8", logits, ref)
    _close(f"V{version} prob", prob, torch.softmax(ref, 1))


def _vgg16_text(version: int, last_pool: bool = True) -> tuple[str, str]:
    return _convs(version, ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), "data", last_pool)


def _shape_only(shapes: dict[str, tuple[int, ...]]) -> dict[str, LayerBlobs]:
    """Blobs that have VGG16's shapes and no data (zero-stride views: no memory)."""
    zero = np.float32(0)
    return {n: LayerBlobs("Convolution" if len(s) == 4 else "InnerProduct",
                          [np.broadcast_to(zero, s), np.broadcast_to(zero, s[:1])]) for n, s in shapes.items()}


def _net(tmp_path, text: str) -> CaffeNet:
    (tmp_path / "net.prototxt").write_text(text)
    return read_prototxt(tmp_path / "net.prototxt", supported=None)


VGG16_CONVS = _conv_shapes(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)))


def test_vgg16_name_mapping_on_shapes_matches_torchvision_and_mlkd_models(tmp_path):
    """The real VGG16 layout (no data): ImageNet names -> torchvision's vgg16 keys and shapes; the release's teacher
    and student names -> mlkd's teacher and student built on the meta device."""
    convs, top = _vgg16_text(1)
    net = _net(tmp_path, 'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 224\ninput_dim: 224\n' + convs
               + _fcs(1, [("fc6", 4096), ("fc7", 4096), ("fc8", 1000)], top))
    weights = _shape_only({**VGG16_CONVS, "fc6": (4096, 25088), "fc7": (4096, 4096), "fc8": (1000, 4096)})
    layout, names = plan_imagenet(net, weights)
    assert layout.backbone_config() == {"backbone": "vgg16"}
    with torch.device("meta"):
        tv = torchvision.models.vgg16().state_dict()
    assert sorted(f"{p}.{k}" for p in names for k in ("weight", "bias")) == sorted(tv)
    assert all(tv[f"{p}.weight"].shape == weights[n].blobs[0].shape for p, n in names.items())

    teacher_convs, _ = _vgg16_text(2, last_pool=False)
    teacher_net = _net(tmp_path, teacher_convs + _fcs(2, [("fc6", 4096), ("fc7", 4096), ("fc8_c", 80)], "roi_pooling")
                       + _fcs(2, [("fc8_d", 80)], "fc7"))
    tw = _shape_only({**VGG16_CONVS, "fc6": (4096, 25088), "fc7": (4096, 4096), "fc8_c": (80, 4096),
                      "fc8_d": (80, 4096)})
    derived, t_names, k = plan_teacher(teacher_net, tw)
    assert k == 80 and derived["backbone"] == "vgg16" and derived["roi_size"] == 7 and derived["hidden"] == 4096
    with torch.device("meta"):
        teacher = build_teacher(TeacherModelConfig(**derived), k).state_dict()
    assert sorted(f"{p}.{s}" for p in t_names for s in ("weight", "bias")) == sorted(teacher)
    assert all(teacher[f"{p}.weight"].shape == tw[n].blobs[0].shape for p, n in t_names.items())

    convs, top = _vgg16_text(2)
    s_net = _net(tmp_path, convs + _fcs(2, [("fc6", 4096), ("fc7", 4096), ("fc8_mscoco", 80)], top))
    sw = _shape_only({**VGG16_CONVS, "fc6": (4096, 25088), "fc7": (4096, 4096), "fc8_mscoco": (80, 4096)})
    derived, s_names, k = plan_student(s_net, sw)
    assert derived["image_size"] == 224 and derived["roi_size"] == 7 and s_names["fc8"] == "fc8_mscoco"
    with torch.device("meta"):
        student = build_student(StudentModelConfig(**derived), k).state_dict()
    assert sorted(f"{p}.{s}" for p in s_names for s in ("weight", "bias")) == sorted(student)
    assert s_names["backbone.features.28"] == "conv5_3"
    assert student["backbone.features.28.weight"].shape == (512, 512, 3, 3)


# -- the release's teacher (wsddn prototxt) --------------------------------------------------------------
TEACHER_BLOCKS, R, K = ((8, 1), (16, 1)), 6, 4  # conv2_1: 16 channels at stride 2; RoI pooling 2 x 2


def _wsddn_head(fc: dict[str, str], bottom: str, temperature_scales: bool = False) -> str:
    """fc6 .. image_level_score as in wsddn_deploy.prototxt (V2), reading ``bottom``."""
    text = _fcs(2, [(fc["fc6"], 32), (fc["fc7"], 32), (fc["fc8_c"], K)], bottom)
    text += _fcs(2, [(fc["fc8_d"], K)], fc["fc7"])
    for branch, src, axis in ((1, fc["fc8_c"], 2), (2, fc["fc8_d"], 1)):
        text += _layer(2, f"reshape_branch{branch}", "Reshape", src, f"reshape_branch{branch}",
                       f"reshape_param {{ shape {{ dim: -1 dim: {R} dim: {K} dim: 1 }} }} ")
        if temperature_scales:
            text += (f'layer {{ name: "temp_branch{branch}_learn" type: "Scale" bottom: "reshape_branch{branch}" '
                     f'top: "reshape_branch{branch}" scale_param {{ axis: {axis} bias_term: false }} }}\n')
    text += _layer(2, "class_score", "Softmax", "reshape_branch1", "class_score", "softmax_param { axis: 2 } ")
    text += _layer(2, "proposal_score", "Softmax", "reshape_branch2", "proposal_score", "softmax_param { axis: 1 } ")
    text += ('layer { name: "proposal_class_score" type: "Eltwise" bottom: "class_score" bottom: "proposal_score" '
             'top: "proposal_class_score" eltwise_param { operation: PROD } }\n')
    text += ('layer { name: "image_level_score" type: "Convolution" bottom: "proposal_class_score" '
             'top: "image_level_score" param { lr_mult: 0 decay_mult: 0 } convolution_param { num_output: 1 '
             'pad_h: 0 pad_w: 0 kernel_h: 1 kernel_w: 1 stride_h: 1 stride_w: 1 weight_filler { type: "constant" '
             'value: 1 } bias_term: false } }\n')
    return text


def _teacher_weights(fc: dict[str, str], conv: str = "conv{b}_{i}", seed: int = 0) -> dict[str, LayerBlobs]:
    shapes = {**_conv_shapes(TEACHER_BLOCKS, conv), fc["fc6"]: (32, 16 * 2 * 2), fc["fc7"]: (32, 32),
              fc["fc8_c"]: (K, 32), fc["fc8_d"]: (K, 32)}
    weights = _random_weights(shapes, seed)
    weights["image_level_score"] = LayerBlobs("Convolution", [np.ones((1, R, 1, 1), np.float32)])
    return weights


RELEASE_FC = {"fc6": "fc6", "fc7": "fc7", "fc8_c": "fc8_c", "fc8_d": "fc8_d"}
ROI_POOLING = ('layer {{ name: "roi_pooling" type: "ROIPooling" bottom: "{conv}" bottom: "roi" top: "roi_pooling" '
               'roi_pooling_param {{ pooled_h: 2 pooled_w: 2 spatial_scale: 0.5 score_scale: 10 score_bias: 1 }} }}\n')


def _wsddn_files(tmp_path):
    """The release's wsddn deploy network (fork layers WsdRoigen / ROIPooling) and the same network with the pooled
    regions as an input, which OpenCV can run."""
    convs, top = _convs(2, TEACHER_BLOCKS, "imagedata", last_pool=False)
    release = ('name: "vgg16_wsddn"\n' + _input(1, "imagedata", (1, 3, 32, 32))
               + _input(1, "proposaldata", (1, 5 * R, 1, 1))
               + 'layer { name: "roi" type: "WsdRoigen" bottom: "proposaldata" top: "roi" }\n' + convs
               + ROI_POOLING.format(conv=top) + _wsddn_head(RELEASE_FC, "roi_pooling")
               + 'layer { name: "loss" type: "CrossEntropyLoss" bottom: "image_level_score" bottom: "labels" '
                 'top: "loss" loss_weight: 1 }\n')
    pooled = ('name: "pooled"\n' + _input(2, "imagedata", (1, 3, 32, 32)) + _input(2, "roi_pooling", (R, 16, 2, 2))
              + convs + _wsddn_head(RELEASE_FC, "roi_pooling"))
    (tmp_path / "wsddn_deploy.prototxt").write_text(release)
    (tmp_path / "pooled.prototxt").write_text(pooled)
    write_caffemodel(tmp_path / "wsddn.caffemodel", _teacher_weights(RELEASE_FC))
    (tmp_path / "classes.txt").write_text("cat\ndog\ncar\nbus\n")
    return tmp_path / "wsddn_deploy.prototxt", tmp_path / "wsddn.caffemodel"


def _boxes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.6
    return torch.cat([xy, xy + (0.2 + 0.4 * torch.rand(n, 2, generator=g)) * size], 1), torch.rand(n, generator=g)


def test_release_wsddn_teacher_import_rebuilds_and_matches_opencv(tmp_path, capsys):
    prototxt, caffemodel = _wsddn_files(tmp_path)
    rc, out, err = _import(tmp_path, capsys, "wsddn", prototxt, caffemodel, "--classes", str(tmp_path / "classes.txt"))
    assert rc == 0, err
    assert "skipped image_level_score: the sum over regions" in out
    ckpt = load_checkpoint(tmp_path / "wsddn.pt", "teacher")
    assert ckpt["input_convention"] == "caffe" and ckpt["classes"] == ["cat", "dog", "car", "bus"]
    assert ckpt["model_config"] | {"tiny_channels": [8, 16]} == ckpt["model_config"]
    m = ckpt["model_config"]
    assert (m["backbone"], m["tiny_convs_per_block"], m["roi_size"], m["hidden"]) == ("tiny", 1, 2, 32)
    assert (m["score_scale"], m["score_bias"], m["input_convention"]) == (10.0, 1.0, "caffe")  # from roi_pooling_param
    assert ckpt["inference"]["image_size"] == 32  # the prototxt's input
    teacher = model_from_checkpoint(ckpt)
    blobs = _teacher_weights(RELEASE_FC)
    assert np.array_equal(teacher.fc8_d.weight.detach().numpy(), blobs["fc8_d"].blobs[0])
    assert np.array_equal(teacher.backbone.features[3].bias.detach().numpy(), blobs["conv2_1"].blobs[1])

    # OpenCV runs everything after the fork's RoI pooling; feed it the imported teacher's pooled regions
    image = torch.from_numpy(np.random.default_rng(2).uniform(-120, 150, (1, 3, 32, 32)).astype(np.float32))
    boxes, scores = _boxes(R, 32, seed=3)
    index = torch.zeros(R, dtype=torch.int64)
    with torch.no_grad():
        fmap = teacher.backbone(image)
        pooled = teacher.pool(fmap, boxes, index) * (10 * scores + 1)[:, None, None, None]
        cls, det = teacher.forward_streams(teacher.forward_regions(fmap, boxes, scores, index))
        result = teacher(image, [boxes], [scores])[0]
    outs = _opencv(tmp_path / "pooled.prototxt", caffemodel,
                   {"imagedata": image.numpy(), "roi_pooling": pooled.numpy()}, ["relu2_1", "fc8_c", "fc8_d", "proposal_class_score", "image_level_score"])
    for name, got, ref in zip(("conv2_1", "fc8_c", "fc8_d", "region scores", "image scores"), outs,
                              (fmap, cls, det, result["region_scores"], result["image_scores"])):
        _close(f"teacher {name}", got, ref)


# -- students: a deploy network (V1, V2) and a KD stage-2 snapshot ------------------------------------------
STUDENT_BLOCKS = ((8, 1), (16, 1))  # conv1_1 pool1 conv2_1 pool2: 32 x 32 -> 16 x 8 x 8


def _student_text(version: int, bottom: str = "data", classifier: str = "fc8_voc") -> str:
    convs, top = _convs(version, STUDENT_BLOCKS, bottom, last_pool=True)
    return convs + _fcs(version, [("fc6", 32), ("fc7", 32), (classifier, K)], top)


def _student_weights(classifier: str = "fc8_voc", seed: int = 1) -> dict[str, LayerBlobs]:
    return _random_weights({**_conv_shapes(STUDENT_BLOCKS), "fc6": (32, 16 * 8 * 8), "fc7": (32, 32),
                            classifier: (K, 32)}, seed)


def _check_student(tmp_path, ckpt_path, deploy, caffemodel, classifier="fc8_voc") -> None:
    ckpt = load_checkpoint(ckpt_path, "student")
    m = ckpt["model_config"]
    assert (ckpt["input_convention"], m["image_size"], m["roi_size"], m["tiny_channels"]) == ("caffe", 32, 8, [8, 16])
    student = model_from_checkpoint(ckpt)
    x = torch.from_numpy(np.random.default_rng(4).uniform(-120, 150, (2, 3, 32, 32)).astype(np.float32))
    (logits,) = _opencv(deploy, caffemodel, {"data": x.numpy()}, [classifier])
    with torch.no_grad():
        _close(f"student {classifier}", logits, student(x))


@pytest.mark.parametrize("version", [1, 2])
def test_student_deploy_import_matches_opencv(tmp_path, capsys, version):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('name: "student"\n' + _input(version, "data", (1, 3, 32, 32)) + _student_text(version))
    write_caffemodel(tmp_path / "student.caffemodel", _student_weights(), version=version)
    (tmp_path / "classes.txt").write_text("cat\ndog\ncar\nbus\n")
    rc, out, err = _import(tmp_path, capsys, "student", deploy, tmp_path / "student.caffemodel", "--classes",
                           str(tmp_path / "classes.txt"))
    assert rc == 0, err
    assert "imported 5 Caffe layers: conv1_1 conv2_1 fc6 fc7 fc8_voc" in out
    _check_student(tmp_path, tmp_path / "student.pt", deploy, tmp_path / "student.caffemodel")


def test_kd_stage2_snapshot_student_and_teacher_copy(tmp_path, capsys):
    """The KD prototxt holds data layers, the frozen teacher copy (conv_wsd_*, fc_wsd_*, learnable temperature
    Scales), the student and the distillation scale: the student is imported, the rest skipped with reasons, and
    --teacher-out imports the teacher copy."""
    kd_fc = {"fc6": "fc_wsd_6", "fc7": "fc_wsd_7", "fc8_c": "fc_wsd_8_c", "fc8_d": "fc_wsd_8_d"}
    teacher_convs, top = _convs(2, TEACHER_BLOCKS, "data", False, "conv_wsd_{b}_{i}", "pool_wsd_{b}")
    text = ('name: "stage2"\nlayer { name: "data" type: "HumanAttData" top: "data" top: "label_roi" '
            'human_att_data_param { batch_size: 2 new_width: 32 new_height: 32 att_num: 4 bbox_num: 6 } }\n'
            'layer { name: "slice" type: "Slice" bottom: "label_roi" top: "label" top: "list_roi" }\n'
            'layer { name: "roi" type: "WsdRoigen" bottom: "list_roi" top: "roi" }\n' + teacher_convs
            + ROI_POOLING.format(conv=top) + _wsddn_head(kd_fc, "roi_pooling", temperature_scales=True)
            + 'layer { name: "data_size224" type: "Interp" bottom: "data" top: "data_s" interp_param { height: 32 } }\n'
            + _student_text(2, bottom="data_s")
            + 'layer { name: "fc8_voc_soft" type: "Scale" bottom: "fc8_voc" top: "fc8_voc_soft" }\n'
            + 'layer { name: "loss_soft" type: "SigmoidCrossEntropyLoss" bottom: "fc8_voc_soft" '
              'bottom: "image_level_score" top: "loss_soft" }\n')
    (tmp_path / "train_stage2.prototxt").write_text(text)
    weights = {**_teacher_weights(kd_fc, "conv_wsd_{b}_{i}", seed=5), **_student_weights(),
               "temp_branch1_learn": LayerBlobs("Scale", [np.full(K, 1.9, np.float32)]),
               "temp_branch2_learn": LayerBlobs("Scale", [np.linspace(1.5, 2.5, R, dtype=np.float32)]),
               "fc8_voc_soft": LayerBlobs("Scale", [np.full(K, 0.2, np.float32)])}
    write_caffemodel(tmp_path / "kd.caffemodel", weights)
    (tmp_path / "classes.txt").write_text("cat\ndog\ncar\nbus\n")
    rc, out, err = _import(tmp_path, capsys, "student", tmp_path / "train_stage2.prototxt", tmp_path / "kd.caffemodel",
                           "--classes", str(tmp_path / "classes.txt"), "--teacher-out", str(tmp_path / "teacher.pt"))
    assert rc == 0, err
    assert "skipped conv_wsd_1_1: the frozen teacher copy" in out
    assert "skipped fc8_voc_soft: L_p' per-class scale" in out
    assert "temp_branch2_learn: learned scales in [1.5, 2.5]" in out
    deploy = tmp_path / "deploy.prototxt"  # the student alone, for OpenCV; the caffemodel also holds the teacher
    deploy.write_text(_input(2, "data", (1, 3, 32, 32)) + _student_text(2))
    _check_student(tmp_path, tmp_path / "student.pt", deploy, tmp_path / "kd.caffemodel")
    teacher = model_from_checkpoint(load_checkpoint(tmp_path / "teacher.pt", "teacher"))
    assert np.array_equal(teacher.fc8_c.weight.detach().numpy(), weights["fc_wsd_8_c"].blobs[0])
    assert np.array_equal(teacher.backbone.features[0].weight.detach().numpy(), weights["conv_wsd_1_1"].blobs[0])
    assert (teacher.score_scale, teacher.roi_size) == (10.0, 2)


# -- errors -----------------------------------------------------------------------------------------------
def test_import_errors_are_clear_through_the_cli(tmp_path, capsys):
    prototxt, caffemodel = _imagenet_files(tmp_path, 2)
    data = caffemodel.read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) // 2])
    rc, _, err = _import(tmp_path, capsys, "vgg16", prototxt, tmp_path / "cut.caffemodel")
    assert rc == 1 and "cut.caffemodel" in err and "not a valid binary caffemodel" in err and "truncated" in err

    bad = tmp_path / "bad.prototxt"
    bad.write_text(prototxt.read_text() + 'layer { name: "bn1" type: "BatchNorm" bottom: "conv1_1" top: "conv1_1" }\n')
    rc, _, err = _import(tmp_path, capsys, "vgg16", bad, caffemodel)
    assert rc == 1 and "layer type unknown to mlkd's Caffe import in 'bn1' (BatchNorm); known types: [" in err

    weights = _random_weights({**_conv_shapes(IMAGENET_BLOCKS), "fc6": (32, 1024), "fc7": (32, 32), "fc8": (10, 32),
                               "fc9": (3, 10)})
    write_caffemodel(tmp_path / "extra.caffemodel", weights)
    rc, _, err = _import(tmp_path, capsys, "vgg16", prototxt, tmp_path / "extra.caffemodel")
    assert rc == 1 and "unexpected ['fc9']" in err and "found ['conv1_1', 'conv1_2'" in err

    del weights["fc9"], weights["fc7"]
    write_caffemodel(tmp_path / "missing.caffemodel", weights)
    rc, _, err = _import(tmp_path, capsys, "vgg16", prototxt, tmp_path / "missing.caffemodel")
    assert rc == 1 and "caffemodel layer 'fc7': expected an InnerProduct with weights (OUT, 32)" in err

    weights = _random_weights({**_conv_shapes(IMAGENET_BLOCKS), "fc6": (32, 1024), "fc7": (32, 32), "fc8": (10, 32)})
    weights["conv2_1"].blobs[0] = np.zeros((16, 4, 3, 3), np.float32)
    write_caffemodel(tmp_path / "shape.caffemodel", weights)
    rc, _, err = _import(tmp_path, capsys, "vgg16", prototxt, tmp_path / "shape.caffemodel")
    assert rc == 1 and ("'conv2_1' (Convolution) has blobs [(16, 4, 3, 3), (16,)]; expected a Convolution with "
                        "[(16, 8, 3, 3), (16,)]") in err

    rc, _, err = _import(tmp_path, capsys, "vgg16", prototxt, caffemodel, "--classifier-name", "fc8")
    assert rc == 1 and "['--classifier-name'] do(es) not apply to --arch vgg16" in err

    text = prototxt.read_text()  # the pooling between the blocks: averaged, a 1x1 window (a student), or absent
    for edit, message in [(("pool: MAX kernel_size: 2", "pool: AVE kernel_size: 2", 1),
                           "prototxt layer 'pool1' is {'pool': 'AVE', 'kernel_size': 2, 'stride': 2}; mlkd's VGG "
                           "backbones need MAX pooling, kernel 2, stride 2, no padding"),
                          (("kernel_size: 2 stride: 2", "kernel_size: 1 stride: 1", 1),
                           "prototxt layer 'pool1' is {'pool': 'MAX', 'kernel_size': 1, 'stride': 1}"),
                          (('name: "pool1"', 'name: "p1"', 1), "the prototxt has no Pooling layer 'pool1' (found "
                                                               "nothing)")]:
        bad.write_text(text.replace(*edit))
        rc, _, err = _import(tmp_path, capsys, "vgg16", bad, caffemodel)
        assert rc == 1 and message in err, err


def test_student_import_errors(tmp_path, capsys):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(_input(2, "data", (1, 3, 32, 32)) + _student_text(2))
    write_caffemodel(tmp_path / "s.caffemodel", _student_weights())
    rc, _, err = _import(tmp_path, capsys, "student", deploy, tmp_path / "s.caffemodel")
    assert rc == 1 and "the model has 4 classes: give their names with --classes FILE" in err
    (tmp_path / "three.txt").write_text("a\nb\nb\n")
    rc, _, err = _import(tmp_path, capsys, "student", deploy, tmp_path / "s.caffemodel", "--classes",
                         str(tmp_path / "three.txt"))
    assert rc == 1 and "lists 3 class names (duplicated: ['b']); the Caffe model has 4 outputs" in err
    deploy.write_text(_input(2, "data", (1, 3, 64, 64)) + _student_text(2))
    (tmp_path / "c.txt").write_text("a\nb\nc\nd\n")
    rc, _, err = _import(tmp_path, capsys, "student", deploy, tmp_path / "s.caffemodel", "--classes",
                         str(tmp_path / "c.txt"))
    assert rc == 1 and "the prototxt's input is 64x64, but fc6 reads a 16x8x8 map after 2 poolings" in err
    five = _student_text(2).replace("kernel_size: 3", "kernel_size: 5", 1)
    deploy.write_text(_input(2, "data", (1, 3, 32, 32)) + five)
    rc, _, err = _import(tmp_path, capsys, "student", deploy, tmp_path / "s.caffemodel", "--classes",
                         str(tmp_path / "c.txt"))
    assert rc == 1 and "prototxt layer 'conv1_1': mlkd's VGG backbones need {'kernel': (3, 3)" in err
