"""`mlkd import-caffe` and `mlkd export`."""

from __future__ import annotations

import argparse

from mlkd.cli.common import positive_float, positive_int

IMPORT_DESCRIPTION = """\
Import a Caffe model (prototxt + caffemodel, V1 or V2) into mlkd. --arch says what it is:

  vgg16    an ImageNet VGG classifier (VGG_ILSVRC_16_layers + its deploy prototxt) -> a weights file in
           torchvision's layout (features.N, classifier.0/3/6) for model.weights of a teacher or a student
  wsddn    a teacher trained with the release's wsddn prototxt (conv*, fc6, fc7, fc8_c, fc8_d) -> a teacher
           checkpoint (needs --classes)
  student  a student of the release's KD prototxts or of `mlkd export` (conv*, fc6, fc7, fc8_<dataset>) -> a
           student checkpoint (needs --classes); a KD snapshot's teacher copy (conv_wsd_*, fc_wsd_*) is skipped,
           or imported with --teacher-out

The architecture is read from both files and must be one mlkd builds (VGG16, or a tiny VGG-style net).
Missing layers, shape mismatches, unknown layer types and layers with weights that mlkd has no place for
are errors. Imported models record the Caffe input convention (BGR, 0-255, minus mean (103.52, 116.28,
123.675)), so evaluation and export use it; re-importing an `mlkd export` of a model trained with the
torchvision convention takes --input-convention torchvision (its export.json says which)."""

EXPORT_DESCRIPTION = """\
Export a checkpoint's model and verify it before reporting success. --format safetensors writes the folder that
mlkd.load() and `mlkd predict` read (model.safetensors + config.json: weights, classes, model config, input
convention; no pickle), checked by reading it back. For caffe and onnx the exported files are run by another
runtime (OpenCV's DNN module for Caffe, onnxruntime for ONNX) on sample images normalised by the model's
convention (a synthetic scene, uniform noise, and --image files), and every output must match PyTorch:
max |runtime - PyTorch| <= tolerance * max(1, max |PyTorch|) (probabilities: the max |.| of their logits).
Otherwise the command fails (exit 1) and leaves the files for inspection.

  student, caffe  student.prototxt + student.caffemodel: conv1_1 ... pool5, fc6, fc7, <classifier>, prob
                  (Sigmoid); VGG-head students only
  student, onnx   student.onnx: input `images` (N, 3, S, S), outputs `logits`, `probabilities` (N, K);
                  --int8 adds student_int8.onnx, its probabilities within 0.1 of PyTorch's on the calibration
                  images
  teacher, caffe  teacher.prototxt + teacher.caffemodel: the release's teacher network without its RoI
                  pooling (an input `roi_pooling`); also checks the weights round trip through import-caffe

Beside them: export.json and README.md with the input convention (channel order, scale, mean, std, size),
the outputs' meaning and the measured differences.

--out is a folder that does not exist, is empty, or holds an export of this checkpoint in this format (refreshed:
files the new export does not write are removed). One that holds another checkpoint's or format's export, or files
mlkd did not write, is refused untouched unless --overwrite. The files are written into a staging folder inside
--out and moved in once all are written: an export that fails leaves the folder as it was."""


def run_import(args: argparse.Namespace) -> int:
    from mlkd.export.caffe.importer import ImportOptions, import_caffe

    opts = ImportOptions(args.classes, args.set, args.classifier_name, args.teacher_out, args.image_size,
                         args.input_convention, overwrite=args.overwrite)
    for r in import_caffe(args.prototxt, args.caffemodel, args.arch, args.out, opts):
        tiny = r.config.get("backbone") == "tiny"
        cfg = ", ".join(f"{k}={v}" for k, v in r.config.items() if k != "weights" and (tiny or "tiny" not in k))
        print(f"{r.kind} -> {r.path}\n  config: {cfg}\n  imported {len(r.imported)} Caffe layers: "
              f"{' '.join(r.imported)}")
        for name, why in sorted(r.skipped.items()):
            print(f"  skipped {name}: {why}")
        for note in r.notes:
            print(f"  note: {note}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from mlkd.export.exporter import export_checkpoint

    info, checks = export_checkpoint(args.checkpoint, args.format, args.out, args.classifier_name, args.opset,
                                     args.tolerance, args.image, args.image_size, args.regions, args.int8,
                                     args.calibration, overwrite=args.overwrite)
    runtime = info["verification"]["runtime"]
    extra = "README.md" if args.format == "safetensors" else "export.json, README.md"
    print(f"{info['kind']} exported as {args.format} to {args.out}: {', '.join(info['files'].values())}, {extra}")
    if args.format == "safetensors":
        print(f"read back by mlkd on {len(info['verification']['images'])} image(s): outputs equal bit for bit; "
              f"load it with mlkd.load({str(args.out)!r})")
        for c in checks:
            print(f"  {c.line('mlkd')}")
        return 0
    print(f"verified with {runtime} on {len(info['verification']['images'])} image(s), tolerance "
          f"{args.tolerance:g} relative to each output's scale (rule in export.json):")
    for c in checks:
        print(f"  {c.line(runtime.split()[0])}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("import-caffe", help="import a Caffe model (ImageNet VGG16, the release's teacher or student)",
                       description=IMPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  mlkd import-caffe --arch vgg16 --prototxt VGG_ILSVRC_16_layers_deploy."
                              "prototxt \\\n      --caffemodel VGG_ILSVRC_16_layers.caffemodel --out vgg16_caffe.pt\n"
                              "  mlkd import-caffe --arch wsddn --prototxt wsddn_deploy.prototxt --caffemodel "
                              "wsddn.caffemodel \\\n      --classes coco_classes.txt --out teacher.pt")
    i.add_argument("--prototxt", required=True, metavar="FILE", help="network definition (.prototxt, V1 or V2)")
    i.add_argument("--caffemodel", required=True, metavar="FILE", help="trained weights (.caffemodel, V1 or V2)")
    i.add_argument("--arch", required=True, choices=("vgg16", "wsddn", "student"), help="what the model is (above)")
    i.add_argument("--out", required=True, metavar="FILE",
                   help="the weights file / checkpoint to write (.pt); refused if it exists, unless --overwrite")
    i.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out / --teacher-out file (written only once the import succeeded)")
    i.add_argument("--classes", metavar="FILE",
                   help="class names, one per line, in the order of the classifier's outputs (wsddn, student)")
    i.add_argument("--classifier-name", metavar="LAYER",
                   help="the student's K-way layer (default: the one InnerProduct named fc8 or fc8_<dataset>)")
    i.add_argument("--teacher-out", metavar="FILE",
                   help="student from a KD stage-2 snapshot: also write its teacher copy (conv_wsd_*, fc_wsd_*) here")
    i.add_argument("--image-size", type=positive_int, metavar="S",
                   help="wsddn: the teacher's test scale (default: the prototxt's input size, else 672)")
    i.add_argument("--input-convention", choices=("caffe", "torchvision"), default="caffe",
                   help="what input the weights expect: caffe (BGR, 0-255, minus mean; every model of the release, "
                        "the default) or torchvision (only for `mlkd export`s of such models: see their export.json)")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a derived model-config key, e.g. score_scale=10 or dropout=0.5; repeatable")
    i.set_defaults(func=run_import)
    _register_export(sub)


def _register_export(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="export a checkpoint to Caffe or ONNX, verified against PyTorch",
                       description=EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  mlkd export --checkpoint runs/demo/student/last.pt --format onnx "
                              "--out export/onnx\n  mlkd export --checkpoint runs/demo/student/last.pt --format caffe "
                              "--out export/caffe --classifier-name fc8_synth")
    e.add_argument("--checkpoint", required=True, metavar="CKPT", help="student or teacher checkpoint (.pt)")
    e.add_argument("--format", required=True, choices=("caffe", "onnx", "safetensors"),
                   help="caffe (prototxt + caffemodel), onnx, or safetensors (a model folder for mlkd.load, no pickle)")
    e.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the files: new, empty, or holding this checkpoint's export in this format (then "
                        "refreshed); anything else is refused unless --overwrite")
    e.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (another checkpoint's or format's export): its files are removed "
                        "once the new export is written; files mlkd did not write are kept")
    e.add_argument("--classifier-name", metavar="LAYER",
                   help="student caffe: name of the K-way layer (default fc8; the release used fc8_<dataset>)")
    e.add_argument("--opset", type=positive_int, default=17,
                   help="onnx: the ONNX opset (default 17; the range this installation exports is checked)")
    e.add_argument("--tolerance", type=positive_float, default=1e-4,
                   help="allowed max abs difference per output, relative to max(1, max |PyTorch|); a finite number "
                        "> 0 (default 1e-4)")
    e.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="also verify on this image file (warped and normalised like the model's input); repeatable")
    e.add_argument("--image-size", type=positive_int, metavar="S",
                   help="teacher: the input size of the deploy prototxt (default: the checkpoint's test_scale)")
    e.add_argument("--int8", action="store_true",
                   help="onnx, student: also write student_int8.onnx (onnxruntime static int8, calibrated on training "
                        "images; the fastest CPU precision, approximate: see docs/benchmarks.md)")
    e.add_argument("--calibration", metavar="SPEC",
                   help="--int8: the training images to calibrate on (default: the training set the checkpoint "
                        "records)")
    e.add_argument("--regions", type=positive_int, metavar="R",
                   help="teacher: proposals per image baked into the prototxt (default: data.max_proposals, else "
                        "500 as in the release)")
    e.set_defaults(func=run_export)
