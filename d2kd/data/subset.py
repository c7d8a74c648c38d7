"""A registered dataset made of the first images of another (fast evaluations, checks)."""

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["register_subset_dataset"]

# Metadata that describes the full dataset's files and must not be shared with a subset
# (the COCO evaluator would otherwise read the full json as ground truth).
_NOT_COPIED = ("name", "json_file")


def register_subset_dataset(name: str, source: str, num_images: int) -> str:
    """
    Register ``name`` as the first ``num_images`` images of the registered dataset
    ``source``, with ``source``'s metadata (classes, evaluator type). Re-registers if
    ``name`` exists. Returns ``name``.
    """
    if source not in DatasetCatalog.list():
        raise KeyError(f"Dataset '{source}' is not registered; cannot take a subset of it.")
    if num_images <= 0:
        raise ValueError(f"A subset needs at least one image, got num_images={num_images}.")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: DatasetCatalog.get(source)[: int(num_images)])
    metadata = {k: v for k, v in MetadataCatalog.get(source).as_dict().items() if k not in _NOT_COPIED}
    MetadataCatalog.get(name).set(**metadata)
    return name
