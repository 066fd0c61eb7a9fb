"""Native 2D images: chest radiographs, as in "Many tasks make light work" (Baugh et al., MICCAI 2023, section 3).
Finding PNG, JPEG and single-image DICOM files (training and inference), their checks from the header alone, the
reader for ``LoadImaged``, and the PNG overlay of a map on its image (``configs/xray.yaml`` uses them all; the
preprocessing transform is :class:`scripts.transforms.RadiographIntensityd`).

Axis order: MONAI's ``PILReader`` and ``PydicomReader`` both return a 2D image as (columns, rows), i.e. the
transpose of its row-major pixel array, and the maps are written in that order (a 2D NIfTI, ``<stem>.nii.gz``).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
from monai.data import ImageReader, PILReader, PydicomReader
from monai.utils import ensure_tuple

from scripts.io.keys import NAME, PATH, SERIES_UID, SOURCE
from scripts.transforms import RadiographIntensity

logger = logging.getLogger(__name__)


RADIOGRAPH_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _is_dicom(path: str | os.PathLike) -> bool:
    try:
        return pydicom.misc.is_dicom(path)
    except OSError:
        return False


def is_radiograph(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like a 2D image this bundle reads (PNG, JPEG, ``.dcm``), or is a DICOM Part 10 file
    by its content, whatever its name."""
    name = Path(path).name.lower()
    return name.endswith(RADIOGRAPH_SUFFIXES) or (Path(path).is_file() and _is_dicom(path))


def check_radiograph(path: str | os.PathLike, max_pixels: int) -> None:
    """Raise ValueError with the reason when ``path`` is not one readable 2D image, from its header alone (nothing
    decoded): a picture PIL cannot identify, a DICOM file without one grey or colour frame, or more pixels than
    ``max_pixels``."""
    path = str(path)
    if _is_dicom(path):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:  # pydicom raises many types for a damaged header
            raise ValueError(f"not a readable DICOM file ({type(err).__name__}: {err})") from err
        frames = int(getattr(header, "NumberOfFrames", 1) or 1)
        if frames != 1:
            raise ValueError(f"a DICOM file of {frames} frames: only single-image radiographs are read here")
        rows, columns = int(getattr(header, "Rows", 0) or 0), int(getattr(header, "Columns", 0) or 0)
        if rows < 1 or columns < 1:
            raise ValueError(f"a DICOM file without an image (Rows {rows}, Columns {columns})")
    else:
        from PIL import Image

        try:
            with Image.open(path) as picture:  # reads the header only
                columns, rows = picture.size
                frames = getattr(picture, "n_frames", 1)
        except Exception as err:  # PIL raises many types, DecompressionBombError included
            raise ValueError(f"not a readable PNG or JPEG image ({type(err).__name__}: {err})") from err
        if frames != 1:
            raise ValueError(f"an image of {frames} frames: one radiograph per file")
    if rows * columns > max_pixels:
        raise ValueError(f"the header claims {columns}x{rows} = {rows * columns} pixels, more than max_scan_voxels "
                         f"({max_pixels}); raise it if such images are real")


def list_radiographs(folder: str | os.PathLike, check_headers: bool = True) -> list[str]:
    """The 2D images of ``folder`` (training: PNG, JPEG, DICOM files), sorted; a clear error for a missing or empty
    folder, or (with ``check_headers``) a file that is not one readable image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {str(folder)!r} does not exist or is not a folder")
    images = sorted(str(p) for p in folder.iterdir() if p.is_file() and is_radiograph(p))
    if not images:
        raise ValueError(f"dataset folder {str(folder)!r} holds no PNG, JPEG or DICOM images")
    if check_headers:
        for image in images:
            try:
                check_radiograph(image, 2**31)
            except ValueError as err:
                raise ValueError(f"image {image!r}: {err}") from None
    return images


def output_name(path: str | os.PathLike, taken: set[str]) -> str:
    """The outputs' name of an image: its stem with ``.nii.gz`` (its map is a NIfTI, its score ``<name>.txt``, as for
    the MOOD volumes), made unique against ``taken`` (``a.png`` and ``a.dcm`` give ``a.nii.gz`` and
    ``a_dcm.nii.gz``)."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    name = f"{stem}.nii.gz"
    if name in taken:
        name = f"{stem}_{path.suffix.lstrip('.').lower() or 'file'}.nii.gz"
    number = 2
    while name in taken:
        name = f"{stem}_{number}.nii.gz"
        number += 1
    taken.add(name)
    return name


def list_radiograph_inputs(input_dir: str | os.PathLike) -> list[dict]:
    """One inference item per 2D image directly in ``input_dir`` (PNG, JPEG, DICOM by suffix or content), sorted by
    file name, with the keys of :func:`scripts.io.cases.list_inputs`: ``name`` (:func:`output_name`),
    ``image_path``, ``image``, ``source`` (the file name) and ``series_uid`` (the DICOM's SeriesInstanceUID, or "").
    Other files and subfolders are named in the log and skipped; a folder without any image is an error."""

    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {str(folder)!r} does not exist or is not a folder")
    items, taken = [], set()
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and is_radiograph(path)):
            logger.warning("skipping %r: not a PNG, JPEG or DICOM image file", path.name)
            continue
        uid = ""
        if _is_dicom(path):
            try:
                uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                          .get("SeriesInstanceUID", ""))
            except Exception:  # an unreadable header: the case fails with its reason when it is read
                uid = ""
        items.append({NAME: output_name(path, taken), PATH: str(path), "image": str(path), SOURCE: path.name,
                      SERIES_UID: uid})
    if not items:
        raise ValueError(f"input folder {str(folder)!r} holds no PNG, JPEG or DICOM images")
    return items


class RadiographReader(ImageReader):
    """``LoadImaged``'s reader of 2D images: DICOM files (by content, whatever their name) through MONAI's
    ``PydicomReader`` with the whole header kept (the window and photometric attributes the preprocessing reads),
    PNG and JPEG through MONAI's ``PILReader``. Both give (columns, rows)."""

    def verify_suffix(self, filename) -> bool:
        return all(is_radiograph(name) for name in ensure_tuple(filename))

    def read(self, data, **kwargs):
        name = str(ensure_tuple(data)[0])
        reader = PydicomReader(prune_metadata=False) if _is_dicom(name) else PILReader()
        return reader, reader.read(name, **kwargs)

    def get_data(self, img):
        reader, image = img
        with warnings.catch_warnings():
            # a radiograph has no ImagePositionPatient (DX: PS3.3 A.26): the pixel grid is the image's own
            warnings.filterwarnings("ignore", message="PydicomReader: ImageOrientationPatient", category=UserWarning)
            array, meta = reader.get_data(image)
        if isinstance(reader, PydicomReader):
            _apply_pixel_spacing(meta)
        return array, meta


def _apply_pixel_spacing(meta: dict) -> None:
    """A radiograph's grid where MONAI's reader has none: without ImageOrientationPatient and ImagePositionPatient
    (a DX file has neither, PS3.3 A.26) it ignores PixelSpacing and leaves a unit grid whose world axes are swapped
    against a PNG's. The grid is then the image's own, as for a PNG (world x along a row, y down the columns), with
    PixelSpacing (calibrated at the patient), else ImagerPixelSpacing (at the detector, PS3.3 C.8.11.4), else 1 mm:
    each tag is (between rows, between columns), and the image's axes are (columns, rows), so the first axis steps
    by the column spacing. A file with both position tags keeps the reader's grid (which used its spacing)."""
    if "00200037" in meta and "00200032" in meta:  # ImageOrientationPatient, ImagePositionPatient
        return
    rows = columns = 1.0
    for tag in ("00280030", "00181164"):  # PixelSpacing, ImagerPixelSpacing
        value = meta[tag].get("Value") if isinstance(meta.get(tag), dict) else None
        try:
            found = [float(v) for v in value]
        except (TypeError, ValueError):
            continue
        if len(found) == 2 and all(np.isfinite(v) and v > 0 for v in found):
            rows, columns = found
            break
    grid = np.diag([columns, rows, 1.0, 1.0])
    for key in ("affine", "original_affine"):
        if key in meta:
            meta[key] = grid.copy()
    meta["spacing"] = np.array([columns, rows])


def read_for_display(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(image, affine)`` of a 2D image file as the bundle preprocesses it, before the resize: its reader, the DICOM
    window, histogram equalisation onto [-1, 1] (xray.yaml's ``FiniteIntensityd`` is left out: equalisation ranks
    the finite values alone); (columns, rows), the grid of its map. The overlay's and the report's background."""
    from monai.transforms import LoadImage


    image = LoadImage(reader=RadiographReader(), image_only=True, ensure_channel_first=True)(str(path))
    return np.asarray(RadiographIntensity()(image))[0], np.asarray(image.affine, dtype=np.float64)
