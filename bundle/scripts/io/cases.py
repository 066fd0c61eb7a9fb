"""Input discovery that never loses a case: one item per NIfTI file and per DICOM series of a folder, the
header-only checks that fail one case with its reason, and the links that let a reader read a file whose name lies."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib

from scripts.io import dicom as dicomio
from scripts.io.files import is_scan
from scripts.io.keys import NAME, PATH, SERIES_UID, SOURCE
from scripts.io.radiographs import check_radiograph, is_radiograph

logger = logging.getLogger(__name__)


# the largest volume a header may claim: 2^28 voxels (645^3, 1 GiB as float32), twice MOOD's 512^3 abdomen; a
# larger claim fails that case at once instead of allocating it
DEFAULT_MAX_VOXELS = 2**28


def nifti_item(path: str | os.PathLike) -> dict:
    """The case item of one NIfTI file: named by the file, read from it (:func:`list_inputs`)."""
    path = Path(path)
    return {NAME: path.name, PATH: str(path), "image": str(path), SOURCE: path.name, SERIES_UID: ""}


def list_inputs(input_dir: str | Path) -> list[dict]:
    """One item per NIfTI file in ``input_dir``, sorted by name, then one per DICOM series in it or in its
    subfolders (searched recursively), in the order of :func:`scripts.io.dicom.find_series`. Each item has ``name``
    (the output name), ``image_path`` and ``image`` (what the reader reads), ``source`` (the input's path relative
    to ``input_dir``) and ``series_uid`` (the SeriesInstanceUID; "" for NIfTI).

    A NIfTI item is named by its file. A series' files, wherever they lie, are linked into a private temporary
    folder (removed at exit) that the reader reads; its name follows :func:`scripts.io.dicom.series_names` and never
    repeats another item's. NIfTI files are read only directly in ``input_dir``: those in subfolders are named in
    the log, as are the subfolders without any DICOM image and other files, which are skipped. A missing folder or
    one without any scan is an error (the bundle run then exits non-zero).
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {str(folder)!r} does not exist or is not a folder")
    items, dicom_files, subfolders = [], [], []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            if path.is_symlink() and is_scan(path):  # broken or looping: scored as unreadable, not skipped
                logger.warning("%r is a broken or looping symbolic link", path.name)
            else:
                if path.is_dir():
                    subfolders.append(path)
                continue
        elif not is_scan(path):
            if dicomio.is_dicom_file(path):
                dicom_files.append(path)
                continue
            hint = ("; an Analyze/NIfTI pair (.hdr/.img): convert it to one .nii.gz"
                    if path.suffix.lower() in (".hdr", ".img") else "")
            logger.warning("skipping %r: not a NIfTI file (*.nii.gz, *.nii)%s", path.name, hint)
            continue
        items.append(nifti_item(path))
    series = dicomio.find_series(folder, dicom_files, subfolders) if dicom_files or subfolders else []
    for found, name in zip(series, dicomio.series_names(series, [item[NAME] for item in items])):
        path = _series_folder(found.files)
        logger.info("%s: DICOM series %s (%s, %d files in %r)", name, found.uid, found.modality or "no modality",
                    len(found.files), found.source)
        items.append({NAME: name, PATH: path, "image": path, SOURCE: found.source, SERIES_UID: found.uid})
    if not items:
        raise ValueError(f"input folder {str(folder)!r} holds no *.nii.gz or *.nii scans and no DICOM series")
    return items


_READ_AS: dict[str, str] = {}


_READ_AS_FOLDER: list[str] = []


def _private_folder() -> Path:
    """This process's private temporary folder (of links for the readers), made on first use and removed at exit."""
    if not _READ_AS_FOLDER:
        import atexit
        import shutil
        import tempfile

        _READ_AS_FOLDER.append(tempfile.mkdtemp(prefix="mood_read_as_"))
        atexit.register(shutil.rmtree, _READ_AS_FOLDER[0], True)
    return Path(_READ_AS_FOLDER[0])


def _series_folder(files: Sequence[Path]) -> str:
    """A new folder in :func:`_private_folder` of links to ``files``, one DICOM series: what MONAI's PydicomReader
    reads as one series (it reads every file of a folder it is given; a list of files would be stacked as
    channels, and the series' own folder may hold other series or files)."""
    import glob
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="series_", dir=_private_folder()))
    if glob.escape(str(folder)) != str(folder):  # PydicomReader globs the folder's files
        raise ValueError(f"the temporary folder {str(folder)!r} has a glob character ([, ], *, ?) in its path, so "
                         "DICOM series cannot be read through it: set TMPDIR to a folder without one")
    for index, file in enumerate(files):
        (folder / f"{index:05d}.dcm").symlink_to(Path(file).resolve())
    return str(folder)


def readable_path(path: str | os.PathLike) -> str:
    """``path``, or a link to it whose suffix matches its content when its name lies: readers choose the
    decompression by the suffix, so a ``.nii.gz`` that is really uncompressed, or a ``.nii`` that is really
    gzipped, would be rejected. The links live in a private temporary folder, removed at exit. A folder (a DICOM
    series) is returned as it is."""
    path = str(path)
    if path in _READ_AS:
        return _READ_AS[path]
    if os.path.isdir(path):
        return path
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError:
        return path  # the reader reports it
    gzipped = magic == b"\x1f\x8b"
    named_gzip = path.lower().endswith(".gz")
    plain_name = not Path(path).name.startswith(".")  # readers choose by the last dots only: "..nii.gz" fails
    if len(magic) < 2 or (gzipped == named_gzip and plain_name):
        return path
    link = _private_folder() / f"scan_{len(_READ_AS)}{'.nii.gz' if gzipped else '.nii'}"
    link.symlink_to(Path(path).resolve())
    if gzipped != named_gzip:
        logger.warning("%s: its content is %s despite its name; read as such", Path(path).name,
                       "gzip-compressed" if gzipped else "not compressed")
    _READ_AS[path] = str(link)
    return str(link)


def check_scan(path: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
    """Raise ValueError with the reason when ``path`` is not a readable 3D NIfTI volume, from its header alone
    (nothing is allocated): the shape, the size it claims against ``max_voxels``, and for an uncompressed file
    against the bytes the file holds. A folder is a DICOM series, checked from its files' headers
    (:func:`scripts.io.dicom.check_series`); a PNG, JPEG or DICOM file a 2D image
    (:func:`scripts.io.radiographs.check_radiograph`)."""
    if os.path.isdir(path):
        dicomio.check_series(path, max_voxels)
        return
    if not is_scan(path):  # a 2D image (xray.yaml's inputs)

        if is_radiograph(path):
            check_radiograph(path, max_voxels)
            return
    path = readable_path(path)
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types for corrupt or empty files
        raise ValueError(f"not a readable NIfTI file ({type(err).__name__}: {err})") from err
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"not a 3D volume: shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"empty 3D volume: shape {shape}")
    voxels = int(shape[0]) * int(shape[1]) * int(shape[2])
    if voxels > max_voxels:
        raise ValueError(f"the header claims {'x'.join(map(str, shape))} = {voxels} voxels, more than "
                         f"max_scan_voxels ({max_voxels}); raise it if such scans are real")
    if not str(path).lower().endswith(".gz"):
        needed = int(image.header.get("vox_offset", 0)) + voxels * image.get_data_dtype().itemsize
        size = os.path.getsize(path)
        if size < needed:
            raise ValueError(f"truncated: the file holds {size} bytes, its header claims {needed}")
