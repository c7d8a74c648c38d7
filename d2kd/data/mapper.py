"""
Image checks that name the broken file.

Detectron2's ``DatasetMapper`` reads each image with PIL when the data loader first needs
it, and a 0-byte, truncated or non-image file then fails inside a loader worker with a
message such as ``cannot identify image file <_io.BufferedReader ...>`` or ``image file is
truncated``, far from the dataset that holds it. Two guards:

- :func:`check_image_file`: a cheap header check (size and magic bytes) run when a dataset
  is loaded, so an unreadable image stops the run before the first iteration;
- :class:`SafeDatasetMapper`: Detectron2's mapper whose errors name the image file and the
  fix (truncated or otherwise corrupt files pass the header check);
- :func:`check_images_decode` (``DATALOADER.DECODE_CHECK True``): every training image decoded
  in full before training, with a progress bar, and one error listing every unreadable file.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

from detectron2.data import DatasetMapper

__all__ = ["DatasetFormatError", "check_image_file", "SafeDatasetMapper", "find_unreadable_images", "check_images_decode"]


class DatasetFormatError(ValueError):
    """A user's dataset file is missing or malformed; the message names the file."""


# Leading bytes of the formats PIL reads that datasets use.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _fix_hint() -> str:
    return "Replace the file with a valid image, or remove it (and its annotation) from the dataset."


def check_image_file(path: str) -> str:
    """
    Raise :class:`DatasetFormatError` naming ``path`` unless it exists, is non-empty and
    starts like a JPEG/PNG/BMP/GIF/TIFF/WebP image. Returns the detected format. Reads 12
    bytes: it does not find truncated files (:class:`SafeDatasetMapper` names those).
    """
    if not os.path.isfile(path):
        raise DatasetFormatError(f"Image file not found: {path}. {_fix_hint()}")
    if os.path.getsize(path) == 0:
        raise DatasetFormatError(f"Image file {path} is empty (0 bytes). {_fix_hint()}")
    with open(path, "rb") as f:
        head = f.read(12)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    raise DatasetFormatError(
        f"Image file {path} is not a readable image (its first bytes {head[:8]!r} match no "
        f"JPEG/PNG/BMP/GIF/TIFF/WebP header). {_fix_hint()}"
    )


class SafeDatasetMapper(DatasetMapper):
    """
    Detectron2's :class:`~detectron2.data.DatasetMapper`; an error while mapping one
    dataset dict (unreadable or truncated image, size mismatch with the annotation, bad
    annotation) is re-raised as :class:`DatasetFormatError` naming the image file.
    """

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except DatasetFormatError:
            raise
        except Exception as e:
            file_name = dataset_dict.get("file_name", "<no file_name>")
            raise DatasetFormatError(
                f"Cannot load dataset image {file_name} (image_id {dataset_dict.get('image_id', '?')}): "
                f"{type(e).__name__}: {e}. {_fix_hint()}"
            ) from e


def _decode_error(file_name: str, image_format: str) -> Optional[str]:
    from detectron2.data.detection_utils import read_image

    try:
        read_image(file_name, format=image_format)  # PIL decodes the whole file, as the loader will
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def find_unreadable_images(
    dataset_dicts: Sequence[dict], image_format: str = "BGR", progress: bool = True, workers: int = 0
) -> List[Tuple[str, str]]:
    """
    ``(file_name, error)`` of every image of ``dataset_dicts`` that does not decode in full
    (truncated, corrupt), in dataset order. Decodes with ``workers`` threads (default: one per
    core) and shows a progress bar (tqdm) when ``progress``.
    """
    files = list(dict.fromkeys(d["file_name"] for d in dataset_dicts))
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = pool.map(lambda f: _decode_error(f, image_format), files)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(files), desc="Decoding training images", unit="img")
        errors = list(results)
    return [(f, e) for f, e in zip(files, errors) if e is not None]


def check_images_decode(dataset_dicts: Sequence[dict], image_format: str = "BGR", progress: bool = True):
    """
    Raise :class:`DatasetFormatError` listing every image :func:`find_unreadable_images` finds.
    In a multi-process run each process decodes its share of the images and the error lists
    those of every process.
    """
    from detectron2.utils import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    bad = find_unreadable_images(list(dataset_dicts)[rank::world], image_format, progress and rank == 0)
    if world > 1:
        bad = [item for part in comm.all_gather(bad) for item in part]
    if bad:
        listed = "\n".join(f"  {f}: {e}" for f, e in bad)
        raise DatasetFormatError(
            f"{len(bad)} of {len(dataset_dicts)} training images cannot be decoded (DATALOADER.DECODE_CHECK):\n"
            f"{listed}\n{_fix_hint()}"
        )
