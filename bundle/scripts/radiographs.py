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
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import ImageReader, PILReader, PydicomReader
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

from scripts.files import write_atomically

__all__ = ["RADIOGRAPH_SUFFIXES", "RadiographReader", "WriteOverlayd", "check_radiograph", "is_radiograph",
           "list_radiograph_inputs", "list_radiographs", "output_name", "read_for_display"]

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
    file name, with the keys of :func:`scripts.inference.list_inputs`: ``name`` (:func:`output_name`),
    ``image_path``, ``image``, ``source`` (the file name) and ``series_uid`` (the DICOM's SeriesInstanceUID, or "").
    Other files and subfolders are named in the log and skipped; a folder without any image is an error."""
    from scripts.inference import NAME, PATH, SERIES_UID, SOURCE

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

    from scripts.transforms import RadiographIntensity

    image = LoadImage(reader=RadiographReader(), image_only=True, ensure_channel_first=True)(str(path))
    return np.asarray(RadiographIntensity()(image))[0], np.asarray(image.affine, dtype=np.float64)


def _grey_uint8(image: torch.Tensor) -> np.ndarray:
    """The preprocessed image ([-1, 1], (1, columns, rows)) as 8-bit grey in row-major display order."""
    grey = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return grey.T.cpu().numpy()


def _heat(probability: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as RGB, black-red-yellow-white (a perceptually ordered heat map)."""
    p = np.clip(probability, 0, 1)[..., None]
    return np.clip(np.concatenate([3 * p, 3 * p - 1, 3 * p - 2], axis=-1), 0, 1)


class WriteOverlayd(MapTransform):
    """Writes ``<output_dir>/<stem>_overlay.png``: the map at ``keys`` drawn over its image as a heat map whose opacity
    is the anomaly probability, so normal tissue stays the image and anomalies glow. The image: with ``source_key``
    (xray.yaml: ``image_path``), the input file itself as the preprocessing sees it before the resize
    (:func:`read_for_display`), at its own size, so the map must be back on the input's grid (listed after the
    inversion); without, the preprocessed image at ``image_key``, on the map's working grid. Nothing for a failed
    case. An overlay that cannot be made (the image unreadable or changed since, no memory) logs a warning and
    leaves none; it never fails the case."""

    def __init__(self, keys: str = "pred", image_key: str = "image", output_dir: str | Path = ".",
                 source_key: str | None = None, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.source_key = source_key
        self.output_dir = Path(output_dir)

    def _background(self, d: Mapping[Hashable, object], shape: tuple[int, ...], stem: str) -> np.ndarray | None:
        if self.source_key is None:
            return _grey_uint8(torch.as_tensor(d[self.image_key]))
        image = torch.as_tensor(read_for_display(d[self.source_key])[0])[None]
        if tuple(image.shape[1:]) != shape:  # the file changed since, or the overlay is listed before the inversion
            logger.warning("%s: no overlay, the map's grid %s is not the image's %s", stem, shape,
                           tuple(image.shape[1:]))
            return None
        return _grey_uint8(image)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from PIL import Image

        from scripts.inference import ERROR, NAME
        from scripts.postprocessing import _remove_stale

        d = dict(data)
        stem = str(d[NAME]).removesuffix(".nii.gz")
        target = self.output_dir / f"{stem}_overlay.png"
        if d.get(ERROR):  # a case that fails now must not keep an earlier run's overlay
            _remove_stale(target)
            return d
        for key in self.key_iterator(d):
            # an overlay is a picture of the result, never a reason to lose it: any failure here is logged and
            # leaves no overlay, while the map and the score are written as ever
            try:
                probability = torch.as_tensor(d[key])[0].float().nan_to_num(0.0).clamp(0, 1)
                grey = self._background(d, tuple(probability.shape), stem)
                if grey is None:
                    _remove_stale(target)
                    continue
                alpha = probability.T.cpu().numpy()[..., None]  # float32 throughout: a large radiograph stays cheap
                picture = (1 - alpha) * (grey[..., None] / np.float32(255)) + alpha * _heat(alpha[..., 0])
                pixels = (picture * 255).round().astype(np.uint8)
                write_atomically(target, lambda tmp, rgb=pixels: Image.fromarray(rgb).save(tmp, format="PNG"))
            except Exception as err:  # noqa: BLE001 - see above
                logger.warning("%s: no overlay (%s: %s)", stem, type(err).__name__, err)
                _remove_stale(target)
        return d
