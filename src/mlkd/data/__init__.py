"""Layer data/, above utils (CONTRIBUTING.md has the rule).

Datasets (one ``(image, target)`` contract), transforms that move boxes with images, synthetic
data, the readers of every format and :func:`~mlkd.data.build.build_dataset`."""

from mlkd.utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "base": ("DatasetIdentity", "ImageRecord", "MultiLabelDataset", "check_class_order", "collate", "read_image"),
    "build": ("DATASET_FORMS", "build_dataset", "parse_spec"),
    "coco": ("CocoDataset",),
    "custom": ("CustomDataset",),
    "datalist": ("DatalistDataset", "InMemoryProposals"),
    "nuswide": ("NusWideDataset",),
    "voc": ("VOC_CLASSES", "VOCDataset"),
    "loader": ("make_loader",),
    "synthetic": ("generate",),
    "transforms": ("Compose", "KeepTopProposals", "MultiScaleCollate", "RandomHorizontalFlip", "ResizeShorter",
                   "ResizeWSDDN", "TeacherStudentViews", "Warp", "rescale_boxes"),
})
