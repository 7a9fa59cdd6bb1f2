"""Caffe model files: read and write ``.caffemodel`` / ``.prototxt`` (V1 and V2), and convert VGG-style models.

Typical use::

    from mlkd.export.caffe import read_caffemodel, import_vgg_weights, vgg_name_map, export_vgg

    # ImageNet VGG16 (V1 caffemodel) -> a K-class student: every layer but fc8
    names = vgg_name_map(student.features, heads={"fc6": "fc6", "fc7": "fc7"})
    state = import_vgg_weights(read_caffemodel("VGG_ILSVRC_16_layers.caffemodel"), names,
                               expected=student.state_dict(), ignore={"fc8"})
    student.load_state_dict(state, strict=False)

    # a student -> deploy prototxt + caffemodel, e.g. for OpenCV's DNN module
    export_vgg(student, "deploy.prototxt", "student.caffemodel", input_size=224, classifier_name="fc8_coco",
               output="sigmoid")

    # the teacher (WSDDN) as the release's network minus its RoI pooling, which becomes the input `roi_pooling`
    export_wsddn(teacher, "teacher.prototxt", "teacher.caffemodel", input_size=672, regions=500)

The architecture of a Caffe file is read and checked by :func:`vgg_layout` (:mod:`mlkd.export.caffe.layout`);
``mlkd import-caffe`` (:mod:`mlkd.export.caffe.importer`) builds on it.

Using a name of this package raises ImportError with the install command when protobuf is missing or too old.
"""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "io": ("net_to_message", "read_caffemodel", "read_prototxt", "write_caffemodel", "write_prototxt"),
    "net": ("SUPPORTED_TYPES", "V1_TO_V2_TYPE", "CaffeLayer", "CaffeNet", "LayerBlobs"),
    "vgg": ("check_pool_rounding", "export_vgg", "feature_sizes", "features_to_caffe", "import_vgg_weights",
            "vgg_layer_names", "vgg_name_map", "vgg_to_caffe"),
    "layout": ("KD_TEACHER", "RELEASE", "Naming", "VggLayout", "vgg_layout"),
    "wsddn": ("export_wsddn", "wsddn_to_caffe"),
    "importer": ("ImportOptions", "import_caffe"),
    "export": ("export_student_caffe", "export_teacher_caffe"),
})
