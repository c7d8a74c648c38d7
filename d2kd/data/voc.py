"""
Pascal VOC loading and registration with validation.

Detectron2 ships ``load_voc_instances``, but it keeps degenerate boxes (BCCD has two
zero-area boxes), assumes ``.jpg`` images and fails with a bare ``ParseError`` or
``ValueError`` on a broken file. This loader names the file and the fix instead: it finds the
image from the annotation's ``<filename>`` (any format), checks the image's size against
``<size>`` when the dataset is loaded, drops zero-area and inverted boxes with a warning that
says which, and clips boxes that extend beyond the image (one warning per file, with a count).
"""

import logging
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .mapper import DatasetFormatError, check_image_file

__all__ = ["load_voc_detection", "read_voc_split", "register_voc_dataset", "find_voc_image"]

# Extensions tried, in order, for an image id when the annotation names no existing file.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")
# EXIF orientations that swap width and height (Detectron2's read_image applies them).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)

logger = logging.getLogger(__name__)


def read_voc_split(dirname: str, split: str) -> List[str]:
    """Image ids listed in ``dirname/ImageSets/Main/<split>.txt``; a clear error if it is missing or empty."""
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not os.path.isfile(split_file):
        raise DatasetFormatError(
            f"Pascal VOC split file not found: {split_file}. A VOC dataset needs "
            "ImageSets/Main/<split>.txt listing one image id per line; check the dataset "
            "root and the split name."
        )
    with open(split_file) as f:
        ids = [line.strip().split()[0] for line in f if line.strip()]
    if not ids:
        raise DatasetFormatError(f"Split file {split_file} lists no images: the dataset is empty.")
    return ids


def _parse_box(obj, anno_file: str) -> List[float]:
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise DatasetFormatError(f"{anno_file}: an <object> has no <bndbox>; fix or remove it.")
    try:
        box = [float(bndbox.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")]
    except (AttributeError, TypeError, ValueError) as e:
        raise DatasetFormatError(
            f"{anno_file}: <bndbox> needs numeric xmin, ymin, xmax, ymax ({e})."
        ) from e
    return box


def find_voc_image(image_dir: str, image_id: str, filename: Optional[str]) -> str:
    """
    The image of ``image_id``: ``image_dir/<filename>`` when the annotation names an existing
    file, else ``image_dir/<image_id><ext>`` for the usual extensions; an error lists what was tried.
    """
    tried = []
    if filename:
        tried.append(os.path.join(image_dir, os.path.basename(filename.strip())))
    tried += [os.path.join(image_dir, image_id + ext) for ext in IMAGE_EXTENSIONS]
    for path in tried:
        if os.path.isfile(path):
            return path
    named = f" (its <filename> is {filename.strip()!r})" if filename else ""
    shown = tried[: 2 if filename else 1]
    raise DatasetFormatError(
        f"Image file not found for image id {image_id!r}{named}: tried {' and '.join(shown)} (and the "
        f"extensions {', '.join(IMAGE_EXTENSIONS[1:])}). Put the image there, or fix the annotation's "
        "<filename> (the split file lists the id)."
    )


def _image_size(image_file: str) -> Tuple[int, int]:
    """(width, height) of ``image_file`` as Detectron2 reads it (EXIF orientation applied); reads the header only."""
    try:
        with Image.open(image_file) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(0x0112)
            except Exception:  # a damaged file: the mapper names it when it decodes the image
                orientation = None
    except Exception as e:  # PIL raises several types for unreadable headers
        raise DatasetFormatError(f"Image file {image_file} cannot be read: {type(e).__name__}: {e}.") from e
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def _parse_annotation(anno_file: str, image_dir: str, image_id: str, class_names: Sequence[str]) -> Dict:
    if not os.path.isfile(anno_file):
        raise DatasetFormatError(f"Annotation file not found: {anno_file} (listed in the split).")
    try:
        tree = ET.parse(anno_file)
    except ET.ParseError as e:
        raise DatasetFormatError(f"Corrupt annotation file {anno_file}: {e}. Fix the XML.") from e
    image_file = find_voc_image(image_dir, image_id, tree.findtext("filename"))
    check_image_file(image_file)  # 0-byte or non-image files fail here, named
    try:
        height = int(tree.findall("./size/height")[0].text)
        width = int(tree.findall("./size/width")[0].text)
    except (IndexError, TypeError, ValueError) as e:
        raise DatasetFormatError(
            f"{anno_file}: <size> must hold integer <width> and <height>."
        ) from e
    annotations = []
    clipped = 0
    for obj in tree.findall("object"):
        name_node = obj.find("name")
        name = name_node.text.strip() if name_node is not None and name_node.text else None
        if name not in class_names:
            raise DatasetFormatError(
                f"{anno_file}: object class {name!r} is not one of the dataset's classes "
                f"{list(class_names)}. Pass the full class list when registering the dataset."
            )
        box = _parse_box(obj, anno_file)
        if box[2] < box[0] or box[3] < box[1]:
            logger.warning(
                f"{anno_file}: dropping an inverted box {box} of class {name} (xmax < xmin or "
                "ymax < ymin): swap the coordinates in the annotation to keep it."
            )
            continue
        if box[2] == box[0] or box[3] == box[1]:  # BCCD has two
            logger.warning(f"{anno_file}: dropping a zero-area box {box} of class {name}.")
            continue
        # VOC coordinates are 1-based inclusive pixel indices; Detectron2 uses 0-based
        # continuous coordinates (the same convention as detectron2's own VOC loader).
        box = [box[0] - 1.0, box[1] - 1.0, box[2], box[3]]
        inside = [min(max(value, 0.0), limit) for value, limit in zip(box, (width, height, width, height))]
        if inside != box:
            clipped += 1
            box = inside
            if box[2] <= box[0] or box[3] <= box[1]:
                logger.warning(f"{anno_file}: dropping a box of class {name} that lies outside the image.")
                continue
        difficult_node = obj.find("difficult")
        difficult = int(difficult_node.text) if difficult_node is not None and difficult_node.text else 0
        annotations.append(
            {
                "category_id": list(class_names).index(name),
                "bbox": box,
                "bbox_mode": BoxMode.XYXY_ABS,
                # VOC "difficult" objects are kept for training, as Detectron2 does;
                # the COCO evaluator ignores them like crowd regions.
                "iscrowd": 0,
                "difficult": difficult,
            }
        )
    actual_width, actual_height = _image_size(image_file)
    if (actual_width, actual_height) != (width, height):
        raise DatasetFormatError(
            f"{anno_file}: <size> says {width}x{height} but its image {image_file} is "
            f"{actual_width}x{actual_height} (width x height). The boxes are drawn on the image the "
            "annotation was made for: replace the image with that one, or, if the annotation is "
            "right for this image, correct <size>."
        )
    if clipped:
        logger.warning(f"{anno_file}: {clipped} box(es) extend beyond the {width}x{height} image and were clipped to it.")
    return {
        "file_name": image_file,
        "image_id": image_id,
        "height": height,
        "width": width,
        "annotations": annotations,
    }


def load_voc_detection(dirname: str, split: str, class_names: Sequence[str]) -> List[Dict]:
    """
    Load a Pascal VOC layout (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``) into
    Detectron2's dataset-dict format, validating every file it reads.

    Args:
        dirname: dataset root.
        split: name of a file in ``ImageSets/Main`` without ``.txt``.
        class_names: the dataset's classes; the index is the category id.
    """
    dicts = []
    for image_id in read_voc_split(dirname, split):
        anno_file = os.path.join(dirname, "Annotations", image_id + ".xml")
        dicts.append(_parse_annotation(anno_file, os.path.join(dirname, "JPEGImages"), image_id, class_names))
    return dicts


def register_voc_dataset(name: str, dirname: str, split: str, class_names: Sequence[str]):
    """
    Register a Pascal VOC dataset of a user's under ``name``, for ``DATASETS.TRAIN/TEST``.

    Evaluation uses COCO-style AP (Detectron2's ``COCOEvaluator`` converts the dicts).
    """
    if not os.path.isdir(dirname):
        raise DatasetFormatError(f"Dataset root {dirname} does not exist.")
    class_names = list(class_names)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_voc_detection(dirname, split, class_names))
    MetadataCatalog.get(name).set(
        thing_classes=class_names, dirname=dirname, split=split, evaluator_type="coco"
    )
