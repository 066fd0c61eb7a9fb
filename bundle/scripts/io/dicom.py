"""DICOM series as inference inputs: finding them in a folder tree and grouping their files by SeriesInstanceUID,
the output name of each, the checks of a series from its headers alone, and a reader for ``LoadImaged`` that reads
NIfTI files as before and a folder of one series' files with MONAI's ``PydicomReader`` (pydicom).

What counts as a DICOM file: a DICOM Part 10 file, i.e. 128 bytes of preamble then ``DICM`` (DICOM PS3.10 section
7.1, what ``pydicom.misc.is_dicom`` checks), whatever its name. A DICOMDIR (Media Storage Directory Storage,
PS3.10 section 8) is an index, not an image, and is ignored: the files it lists are found by the folder search.

The grid of a series is MONAI's ``PydicomReader``'s: voxel (i, j, k) is column i, row j of the k-th slice in
InstanceNumber order (shape Columns x Rows x slices), and its affine maps voxel centres to patient coordinates,
ImagePositionPatient + i * PixelSpacing[1] * (row direction) + j * PixelSpacing[0] * (column direction) + k * (the
step between slice positions) (PS3.3 C.7.6.2.1.1 and C.7.6.3.1.1), converted from DICOM's LPS to NIfTI's RAS by
negating x and y. :func:`check_series` makes sure the reader's assumptions hold (one frame per file, equal slice
sizes and orientations, InstanceNumber in the order of the slice positions, evenly spaced), so that this affine
describes every slice, not only the first and the last.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from monai.data import ImageReader, PydicomReader
from monai.utils import ensure_tuple

from scripts.io.files import is_scan
from scripts.io.nifti import ContiguousNibabelReader

__all__ = ["DicomSeries", "NiftiOrDicomReader", "check_series", "find_series", "is_dicom_file", "series_names"]

logger = logging.getLogger(__name__)

# the header elements discovery needs; the pixel data is never read there
_DISCOVERY_TAGS = ["SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "SOPClassUID",
                   "SOPInstanceUID"]
# pixel data elements (PS3.3 C.7.6.3): Pixel Data, Float Pixel Data, Double Float Pixel Data
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
# header values up to this size are read by check_series; larger ones (the pixel data) only located
_DEFER_BYTES = 256
# slice positions closer to even than this (mm, or this fraction of the step) count as evenly spaced: DICOM's
# decimal strings (DS, at most 16 characters) round positions
_SPACING_ATOL_MM, _SPACING_RTOL = 1e-2, 1e-2
_NAME_STEM_CHARS = 120  # the output names stay far below the 255 bytes of a file name, with ".nii.gz.txt" added


@dataclass
class DicomSeries:
    """The files of one series (SeriesInstanceUID ``uid``), in path order, and what names it: ``source`` is the
    folder that holds them relative to the input folder (their common folder when they lie in several; ``.`` for
    the input folder itself), ``number`` and ``description`` its SeriesNumber and SeriesDescription ("" when
    absent)."""

    uid: str
    files: list[Path] = field(default_factory=list)
    source: str = "."
    number: str = ""
    description: str = ""
    modality: str = ""


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (PS3.10 section 7.1: ``DICM`` after the 128-byte preamble)."""
    try:
        return pydicom.misc.is_dicom(path)
    except OSError:
        return False


def _read_discovery_header(path: Path):
    """(header, "") of a DICOM file, or (None, the reason it cannot be a series member)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DISCOVERY_TAGS)
    except Exception as err:  # pydicom raises many types for a damaged header
        return None, f"its header cannot be read ({type(err).__name__}: {err})"
    storage = getattr(getattr(header, "file_meta", None), "MediaStorageSOPClassUID", None)
    if storage == pydicom.uid.MediaStorageDirectoryStorage:
        return None, "DICOMDIR"
    if not str(header.get("SeriesInstanceUID", "") or "").strip():
        return None, "it has no SeriesInstanceUID"
    return header, ""


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class _Folder:
    """What the search found in one folder: files of a series, NIfTI files, DICOM files that cannot be read
    (name, reason), other files, and whether it has subfolders."""

    def __init__(self) -> None:
        self.series_files, self.nifti, self.other = 0, [], []
        self.broken: list[tuple[str, str]] = []
        self.index, self.subfolders = False, False

    def problems(self) -> list[str]:
        parts = []
        if self.nifti:
            parts.append(f"{_plural(len(self.nifti), 'NIfTI file')} ({_examples(self.nifti)}; only the input "
                         "folder's own NIfTI files are scored: move them up to score them)")
        if self.broken:
            name, reason = self.broken[0]
            parts.append(f"{_plural(len(self.broken), 'DICOM file')} that cannot be read as part of a series "
                         f"({name!r}: {reason}{', ...' if len(self.broken) > 1 else ''})")
        if self.other:
            parts.append(f"{_plural(len(self.other), 'file')} that {'is' if len(self.other) == 1 else 'are'} not "
                         f"DICOM ({_examples(self.other)})")
        return parts


def _examples(names: Sequence[str], count: int = 3) -> str:
    return ", ".join(map(repr, names[:count])) + (", ..." if len(names) > count else "")


def _walk(root: Path, top: Path, seen: set[str]) -> Iterable[tuple[Path, list[str], list[str]]]:
    """``os.walk`` of ``top`` (in ``root``), sorted, following links to folders but never into a folder twice (a
    link loop, or two links to one folder)."""
    def failed(err: OSError) -> None:
        name = os.path.relpath(err.filename, root) if err.filename else str(top.relative_to(root))
        logger.warning("skipping folder %r: it cannot be read (%s: %s)", name, type(err).__name__,
                       err.strerror or err)

    for folder, dirs, files in os.walk(top, onerror=failed, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield Path(folder), dirs, sorted(files)


def _regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def find_series(root: str | os.PathLike, files: Sequence[str | os.PathLike] = (),
                folders: Sequence[str | os.PathLike] = ()) -> list[DicomSeries]:
    """The DICOM series among ``files`` (DICOM files directly in the input folder ``root``) and in ``folders``
    (subfolders of ``root``, searched recursively), their files grouped by SeriesInstanceUID wherever they lie,
    ordered by source folder, SeriesNumber and UID. A file that repeats an image of its series (the same
    SOPInstanceUID: a copy, or a link in another folder) is left out, with one warning per series.

    Every subfolder that gives no file to any series is named in the log, once, with the reason (no DICOM image
    files: empty, NIfTI files, which are read only at the top of the input folder, unreadable DICOM headers, other
    files); so is a subfolder whose series lie next to such files, and a top-level DICOM file that cannot be read.
    A folder that holds only subfolders is not named itself: its subfolders are.
    """
    root = Path(root)
    by_uid: dict[str, DicomSeries] = {}
    parents: dict[str, set[str]] = defaultdict(set)
    images: dict[str, set[str]] = defaultdict(set)  # per series: the SOPInstanceUIDs (or real paths) taken
    repeats: dict[str, int] = defaultdict(int)

    def add(path: Path, header, folder: str) -> None:
        uid = str(header.SeriesInstanceUID).strip()
        series = by_uid.setdefault(uid, DicomSeries(uid))
        # the same image twice (a copy, or a link in another folder): read once
        image = str(header.get("SOPInstanceUID", "") or "").strip() or os.path.realpath(path)
        if image in images[uid]:
            repeats[uid] += 1
            return
        images[uid].add(image)
        series.files.append(path)
        parents[uid].add(folder)
        for attribute, keyword in (("number", "SeriesNumber"), ("description", "SeriesDescription"),
                                   ("modality", "Modality")):
            value = str(header.get(keyword, "") or "").strip()
            if value and not getattr(series, attribute):
                setattr(series, attribute, value)

    for path in map(Path, files):
        header, reason = _read_discovery_header(path)
        if header is not None:
            add(path, header, ".")
        elif reason == "DICOMDIR":
            logger.info("%r: a DICOMDIR index, not an image (its series are found by the folder search)", path.name)
        else:
            logger.warning("skipping %r: a DICOM file, but %s", path.name, reason)

    seen: set[str] = {os.path.realpath(root)}
    for top in map(Path, folders):
        for folder, dirs, names in _walk(root, top, seen):
            relative = folder.relative_to(root).as_posix()
            found = _Folder()
            found.subfolders = bool(dirs)
            for name in names:
                path = folder / name
                if is_scan(path):
                    found.nifti.append(name)
                elif not _regular_file(path):  # a pipe or a device would block the read, a broken link fails it
                    found.other.append(name)
                elif not is_dicom_file(path):
                    found.other.append(name)
                else:
                    header, reason = _read_discovery_header(path)
                    if header is not None:
                        add(path, header, relative)
                        found.series_files += 1
                    elif reason == "DICOMDIR":
                        found.index = True
                    else:
                        found.broken.append((name, reason))
            problems = found.problems()
            if not found.series_files:
                if not names and found.subfolders:
                    continue  # a folder of folders: those are named themselves
                if not names:
                    logger.warning("skipping folder %r: no DICOM image files (the folder is empty)", relative)
                else:
                    why = "; ".join(problems) or "a DICOMDIR index"
                    logger.warning("skipping folder %r: no DICOM image files, only %s", relative, why)
            elif problems:
                logger.warning("folder %r: skipping %s", relative, "; ".join(problems))

    for uid, series in by_uid.items():
        if repeats[uid]:
            logger.warning("DICOM series %s: %s the same image (SOPInstanceUID) as another file; read once", uid,
                           f"{_plural(repeats[uid], 'file')} {'holds' if repeats[uid] == 1 else 'hold'}")
        series.files.sort()
        folders_of = sorted(parents[uid])
        series.source = folders_of[0] if len(folders_of) == 1 else (
            Path(os.path.commonpath([str(root / f) for f in folders_of])).relative_to(root).as_posix())

    def order(series: DicomSeries):
        number = series.number
        return series.source, (0, float(number), "") if _is_number(number) else (1, 0.0, number), series.uid

    return sorted(by_uid.values(), key=order)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _safe(text: str) -> str:
    """``text`` with every run of characters outside ``A-Z a-z 0-9 . _ -`` turned into one ``_``, and no dot, dash
    or underscore at either end (a leading dot would hide the file)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")


def series_names(series: Sequence[DicomSeries], taken: Iterable[str] = ()) -> list[str]:
    """The output name of each series (the pixel map is written as ``<name>``, the score as ``<name>.txt``).

    The rule: ``<source folder>_S<SeriesNumber>_<SeriesDescription>.nii.gz``, the source folder's ``/`` turned into
    ``_`` (left out for the input folder itself), ``S<SeriesNumber>`` and the description left out when absent and
    the SeriesInstanceUID used when both are; every character outside ``A-Z a-z 0-9 . _ -`` turned into ``_``, and
    at most 120 characters before ``.nii.gz``. A name already ``taken`` (a NIfTI input's, or an earlier series',
    letter case ignored) gets ``_<the UID's last 8 digits>``, then ``_2``, ``_3`` ... until it is unique.
    """
    used = {name.lower() for name in taken}
    names = []
    for item in series:
        parts = [] if item.source == "." else [item.source.replace("/", "_")]
        labels = [f"S{item.number}" if item.number else "", item.description]
        parts += [label for label in labels if label] or [item.uid]
        stem = _safe("_".join(parts))[:_NAME_STEM_CHARS].rstrip("._-") or "series"
        candidates = [stem, f"{stem}_{re.sub(r'[^0-9]', '', item.uid)[-8:]}"]
        candidates += [f"{candidates[1]}_{k}" for k in range(2, len(series) + len(used) + 3)]
        name = next(f"{c}.nii.gz" for c in candidates if f"{c}.nii.gz".lower() not in used)
        used.add(name.lower())
        names.append(name)
    return names


def _number(header, keyword: str, file: str, default=None):
    value = header.get(keyword, default)
    if value is None or value == "":
        raise ValueError(f"{file!r} has no {keyword}")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{file!r}: {keyword} {value!r} is not a number") from None


def check_series(folder: str | os.PathLike, max_voxels: int) -> tuple[int, int, int]:
    """Raise ValueError with a one-line reason when the series whose files (or links to them) are in ``folder`` is
    not a 3D volume MONAI's ``PydicomReader`` reads with a correct affine, from the headers alone (the pixel data is
    only located, not read): an image SOP class with pixel data of the size the header claims, one frame and one
    sample per pixel in each file, at least two slices of the same size, orientation and pixel spacing, each with
    ImagePositionPatient and a distinct InstanceNumber, evenly spaced in InstanceNumber order, and at most
    ``max_voxels`` voxels. Returns the grid's shape (Columns, Rows, slices)."""
    paths = sorted(Path(folder).iterdir())
    slices = []
    for path in paths:
        file = path.resolve().name
        try:
            header = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        except Exception as err:
            raise ValueError(f"{file!r} cannot be read ({type(err).__name__}: {err})") from err
        meta = getattr(header, "file_meta", None)
        sop = str(header.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "") or "")
        pixels = next((header.get_item(tag, keep_deferred=True) for tag in _PIXEL_TAGS if tag in header), None)
        if pixels is None or "Rows" not in header or "Columns" not in header:
            kind = pydicom.uid.UID(sop).name if sop else "unknown"
            what = "not an image" if "Image" not in kind else "no pixel data"
            raise ValueError(f"{what}: {file!r} (SOP class {kind}) has no pixel data")
        frames = int(header.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ValueError(f"{file!r} is a multi-frame image ({frames} frames): not read; convert the series to "
                             "NIfTI (e.g. with dcm2niix)")
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        if samples != 1:
            raise ValueError(f"{file!r} has {samples} samples per pixel (a colour image), not one intensity")
        rows, columns = int(header.Rows), int(header.Columns)
        syntax = getattr(meta, "TransferSyntaxUID", None)
        if syntax is not None and not syntax.is_transfer_syntax:
            raise ValueError(f"{file!r}: unknown transfer syntax {str(syntax)!r}")
        if syntax is not None and syntax.is_encapsulated and not _decodable(syntax):
            raise ValueError(f"{file!r}: its pixel data is compressed as {syntax.name}, which none of pydicom's "
                             "installed decoders reads (python-gdcm or pylibjpeg would)")
        if syntax is not None and not syntax.is_encapsulated:
            needed = rows * columns * int(header.get("BitsAllocated", 16) or 16) // 8
            if isinstance(pixels, pydicom.dataelem.RawDataElement):  # deferred: its length and where it starts
                held = min(pixels.length, os.path.getsize(path) - pixels.value_tell)
            else:  # small enough to have been read
                held = len(pixels.value or b"")
            if held < needed:
                raise ValueError(f"{file!r} is truncated: its pixel data holds {max(held, 0)} bytes, its header "
                                 f"claims {needed}")
        position = _number(header, "ImagePositionPatient", file)
        orientation = _number(header, "ImageOrientationPatient", file)
        if position.shape != (3,) or orientation.shape != (6,) or not np.isfinite([*position, *orientation]).all():
            raise ValueError(f"{file!r}: ImagePositionPatient or ImageOrientationPatient is not 3 or 6 finite numbers")
        spacing = _number(header, "PixelSpacing", file, default=[1.0, 1.0])
        instance = _number(header, "InstanceNumber", file)
        slices.append((float(instance), file, (rows, columns), position, orientation, spacing))
    if not slices:
        raise ValueError("no DICOM files")
    if len(slices) == 1:
        raise ValueError(f"a single 2D image ({slices[0][1]!r}), not a 3D series")
    slices.sort(key=lambda s: s[0])
    first = slices[0]
    for _, file, size, _, orientation, spacing in slices[1:]:
        if size != first[2]:
            raise ValueError(f"slices of different sizes: {first[1]!r} is {first[2][0]}x{first[2][1]} (rows x "
                             f"columns), {file!r} {size[0]}x{size[1]}")
        if not np.allclose(orientation, first[4], atol=1e-4):
            raise ValueError(f"slices of different orientations: {first[1]!r} and {file!r}")
        if spacing.shape != first[5].shape or not np.allclose(spacing, first[5], rtol=1e-4):
            raise ValueError(f"slices of different pixel spacings: {first[1]!r} and {file!r}")
    numbers = [s[0] for s in slices]
    if len(set(numbers)) != len(numbers):
        twice = next(n for n in numbers if numbers.count(n) > 1)
        raise ValueError(f"several slices have InstanceNumber {twice:g} (several echoes, phases or stacks in one "
                         "series?)")
    steps = np.diff(np.stack([s[3] for s in slices]), axis=0)
    step = (slices[-1][3] - first[3]) / (len(slices) - 1)
    deviation = float(np.abs(steps - step).max())
    if np.linalg.norm(step) < _SPACING_ATOL_MM or deviation > max(_SPACING_ATOL_MM,
                                                                  _SPACING_RTOL * np.linalg.norm(step)):
        lengths = np.linalg.norm(steps, axis=1)
        raise ValueError(f"slice positions are not evenly spaced in InstanceNumber order (steps of {lengths.min():.3g} "
                         f"to {lengths.max():.3g} mm): a missing slice, or several stacks in one series")
    shape = (first[2][1], first[2][0], len(slices))  # columns, rows, slices: the reader's grid
    voxels = shape[0] * shape[1] * shape[2]
    if voxels > max_voxels:
        raise ValueError(f"the headers claim {'x'.join(map(str, shape))} = {voxels} voxels, more than "
                         f"max_scan_voxels ({max_voxels}); raise it if such scans are real")
    return shape


def _decodable(syntax: pydicom.uid.UID) -> bool:
    """Whether an installed pixel data decoder of pydicom reads ``syntax`` (uncompressed, deflate and RLE need none
    but NumPy; JPEG baseline and JPEG 2000 come with Pillow; JPEG lossless and JPEG-LS need another package)."""
    try:
        return pydicom.pixels.get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        return False


class _Deferred:
    """A DICOM series folder that ``NiftiOrDicomReader.read`` accepted: read in ``get_data``, so that the reader's
    own error reaches the case's reason (LoadImage would otherwise try every other reader and report only that
    none fits)."""

    def __init__(self, folder: str, kwargs: dict) -> None:
        self.folder, self.kwargs = folder, kwargs


class NiftiOrDicomReader(ImageReader):
    """The inference's reader: a NIfTI file through ``nifti_reader`` (:class:`ContiguousNibabelReader`, exactly as
    before), a folder through a new MONAI ``PydicomReader`` per read (it keeps state between ``read`` and
    ``get_data``), which reads the folder's files as one series, its affine converted from LPS to RAS."""

    def __init__(self, nifti_reader: ImageReader | None = None, **dicom_kwargs) -> None:
        super().__init__()
        self.nifti_reader = nifti_reader or ContiguousNibabelReader()
        self.dicom_kwargs = {"affine_lps_to_ras": True, "swap_ij": True, **dicom_kwargs}

    @staticmethod
    def _is_folder(data) -> bool:
        names = ensure_tuple(data)
        return len(names) == 1 and os.path.isdir(names[0])

    def verify_suffix(self, filename) -> bool:
        return self._is_folder(filename) or self.nifti_reader.verify_suffix(filename)

    def read(self, data, **kwargs):
        if self._is_folder(data):
            return _Deferred(str(ensure_tuple(data)[0]), kwargs)
        return self.nifti_reader.read(data, **kwargs)

    def get_data(self, img):
        if isinstance(img, _Deferred):
            reader = PydicomReader(**self.dicom_kwargs)
            return reader.get_data(reader.read(img.folder, **img.kwargs))
        return self.nifti_reader.get_data(img)
