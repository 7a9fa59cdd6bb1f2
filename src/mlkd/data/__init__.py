"""Datasets (one ``(image, target)`` contract), transforms that move boxes with images, synthetic data."""

from mlkd.data.base import DatasetIdentity, ImageRecord, MultiLabelDataset, collate

__all__ = ["DatasetIdentity", "ImageRecord", "MultiLabelDataset", "collate"]
