"""Inference on new scans: the argument checks, input discovery that never loses a case, the dataset that turns
an unreadable scan into an item with its reason, and the engine that passes such items to the writers
(``scripts.postprocessing``) without running the network (the ensemble is in ``scripts.ensemble``)."""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import torch
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents

from scripts import dicomio
from scripts.files import is_scan
from scripts.niftiio import read_tolerantly

__all__ = ["AnomalyInferenceEngine", "DEFAULT_MAX_VOXELS", "IDENTITY", "MODES", "PrefetchingDataLoader",
           "RobustDataset", "check_arguments",
           "describe_error", "exit_cleanly_on_sigterm", "list_inputs", "one_line_errors", "readable_path", "show_usage"]

logger = logging.getLogger(__name__)

# keys of every case item: the output name, what the reader reads, and why it could not be scored ("" when it
# could); where it came from (its path relative to the input folder) and its DICOM SeriesInstanceUID ("" for NIfTI)
NAME, PATH, ERROR = "name", "image_path", "error"
SOURCE, SERIES_UID = "source", "series_uid"
# what a failed case keeps of its item
IDENTITY = (NAME, PATH, SOURCE, SERIES_UID)


# what a run writes: pixel maps, sample scores, or both from one pass of the ensemble
MODES = ("pixel", "sample", "both")
# the largest volume a header may claim: 2^28 voxels (645^3, 1 GiB as float32), twice MOOD's 512^3 abdomen; a
# larger claim fails that case at once instead of allocating it
DEFAULT_MAX_VOXELS = 2**28


def check_arguments(dataset_dir, output_dir, mode: str, pixel_output_dir=None, sample_output_dir=None) -> None:
    """The checks before any work: one clear error for a missing argument, an unknown mode, an output folder that
    is a file, or a pixel output folder that is the input folder (the maps carry the scans' names and would
    replace them). ``pixel_output_dir`` and ``sample_output_dir`` default to ``output_dir``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not dataset_dir:
        raise ValueError("--dataset_dir (or --input_dir) is required: the folder of scans to score")
    folders = {"pixel": pixel_output_dir or output_dir, "sample": sample_output_dir or output_dir}
    written = ("pixel", "sample") if mode == "both" else (mode,)
    if not all(folders[kind] for kind in written):
        raise ValueError("--output_dir is required")
    if not Path(dataset_dir).is_dir():
        raise FileNotFoundError(f"input folder {str(dataset_dir)!r} does not exist or is not a folder")
    for kind in written:
        if Path(folders[kind]).exists() and not Path(folders[kind]).is_dir():
            raise ValueError(f"output folder {str(folders[kind])!r} exists and is not a folder")
    if "pixel" in written and Path(dataset_dir).resolve() == Path(folders["pixel"]).resolve():
        raise ValueError(f"output folder {str(folders['pixel'])!r} is the input folder: the pixel maps would replace "
                         "the scans (they carry the scans' names); choose another output folder")


def describe_error(err: BaseException) -> str:
    """One line for a failure: the innermost cause (MONAI nests the real error inside "applying transform"
    wrappers) with its type, and the transform that raised it when there is one."""
    stage, inner = None, err
    # MONAI's wrappers: a transform's ("applying transform <...>") and a config expression's ("Failed to evaluate")
    while inner.__cause__ is not None and re.search(r"applying transform|Failed to evaluate", str(inner)):
        match = re.search(r"applying transform <([\w.]+)", str(inner))
        stage = match.group(1).rsplit(".", 1)[-1] if match else stage
        inner = inner.__cause__
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    reason = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    if isinstance(inner, ValueError) and text:  # the bundle's own checks: their message says it all
        reason = text
    return f"{stage}: {reason}" if stage else reason


def one_line_errors(debug_variable: str = "MOOD_DEBUG") -> None:
    """An error that ends a command-line run prints one line, its real cause (:func:`describe_error`), instead of
    a traceback of MONAI's config machinery; ``MOOD_DEBUG=1`` keeps the traceback. Only uncaught errors are
    affected, so callers that handle errors themselves see no difference."""
    import sys

    if os.environ.get(debug_variable) == "1":
        return

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            return sys.__excepthook__(kind, value, traceback)
        print(f"error: {describe_error(value)}  ({debug_variable}=1 shows the traceback)", file=sys.stderr)

    sys.excepthook = hook


def show_usage(requested: bool, usage: str) -> None:
    """``--help`` of a bundle workflow: MONAI's command line passes it on as the config key ``help``; print the
    config's ``usage`` and exit 0 before any work."""
    import sys

    if requested:
        print(usage.rstrip())
        sys.exit(0)


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler's stop, MOOD's time limit) into SystemExit, so the writers remove their
    half-written temporary file instead of leaving it behind."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def list_inputs(input_dir: str | Path) -> list[dict]:
    """One item per NIfTI file in ``input_dir``, sorted by name, then one per DICOM series in it or in its
    subfolders (searched recursively), in the order of :func:`scripts.dicomio.find_series`. Each item has ``name``
    (the output name), ``image_path`` and ``image`` (what the reader reads), ``source`` (the input's path relative
    to ``input_dir``) and ``series_uid`` (the SeriesInstanceUID; "" for NIfTI).

    A NIfTI item is named by its file. A series' files, wherever they lie, are linked into a private temporary
    folder (removed at exit) that the reader reads; its name follows :func:`scripts.dicomio.series_names` and never
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
        items.append({NAME: path.name, PATH: str(path), "image": str(path), SOURCE: path.name, SERIES_UID: ""})
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


def _check_scan(path: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
    """Raise ValueError with the reason when ``path`` is not a readable 3D NIfTI volume, from its header alone
    (nothing is allocated): the shape, the size it claims against ``max_voxels``, and for an uncompressed file
    against the bytes the file holds. A folder is a DICOM series, checked from its files' headers
    (:func:`scripts.dicomio.check_series`); a PNG, JPEG or DICOM file a 2D image
    (:func:`scripts.radiographs.check_radiograph`)."""
    if os.path.isdir(path):
        dicomio.check_series(path, max_voxels)
        return
    if not is_scan(path):  # a 2D image (xray.yaml's inputs)
        from scripts.radiographs import check_radiograph, is_radiograph

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


def _identity(item: Mapping) -> dict:
    """What a failed case keeps of its item: :data:`IDENTITY`, the missing ones empty (an item of a caller that
    gives only ``name`` and ``image_path``)."""
    return {key: item.get(key, "") for key in IDENTITY}


class RobustDataset(torch.utils.data.Dataset):
    """Applies ``transform`` to each input item; a scan that cannot be read or preprocessed becomes an item
    with only its ``name``, ``image_path``, ``source``, ``series_uid`` and the ``error`` (the reason), so one bad
    file never stops the rest. Good items carry ``error = ""``."""

    def __init__(self, data: Sequence[dict], transform, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
        self.data = list(data)
        self.transform = transform
        self.max_voxels = max_voxels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.data[index])
        try:
            def load() -> dict:
                _check_scan(item[PATH], self.max_voxels)
                return self.transform({**item, "image": readable_path(item[PATH])})

            out = read_tolerantly(load, item[NAME])
            image = out["image"]
            if not torch.isfinite(torch.as_tensor(image)).all():
                raise ValueError("non-finite intensities remain after preprocessing")
            out[ERROR] = ""
            return out
        except Exception as err:  # MemoryError included: this case fails, the others go on
            return {**_identity(item), ERROR: describe_error(err)}


class PrefetchingDataLoader(DataLoader):
    """MONAI's ``DataLoader`` that loads the next batch in a background thread while the current one is scored, one
    batch ahead (so at most two cases are in memory). Unlike MONAI's ``ThreadDataLoader``, whose thread ends the
    iteration silently when it meets an error, an error in the thread is raised where the batch was asked for: the
    run stops with it instead of skipping the remaining cases. A thread, not worker processes: those need
    /dev/shm and short TMPDIR paths for their sockets."""

    def __iter__(self):
        batches = super().__iter__()
        handoff: queue.Queue = queue.Queue(maxsize=1)

        def load() -> None:
            try:
                for batch in batches:
                    handoff.put(("batch", batch))
                    handoff.join()  # until it is taken: the next one is loaded while it is scored, not earlier
                handoff.put(("end", None))
            except BaseException as err:  # handed to the consumer, which raises it
                handoff.put(("error", err))

        threading.Thread(target=load, name="case-loader", daemon=True).start()
        while True:
            kind, value = handoff.get()
            handoff.task_done()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value


class AnomalyInferenceEngine(SupervisedEvaluator):
    """A SupervisedEvaluator that isolates every case: items that failed to load (``error`` set) go straight to
    the postprocessing without the network, so the writers log them and write fallbacks; a case whose network
    pass, inverse transform or writer raises becomes such an item too, and the run goes on with the next."""

    def _iteration(self, engine, batchdata):
        errors = batchdata.get(ERROR) if isinstance(batchdata, Mapping) else None
        if errors is not None and any(errors):
            return self._postprocess_failed(engine, batchdata)
        try:
            return super()._iteration(engine, batchdata)
        except Exception as err:
            reason = describe_error(err)
            failed = {key: list(batchdata[key]) for key in IDENTITY if key in batchdata}
            failed[ERROR] = [reason] * len(batchdata[NAME])
            logger.error("%s: scoring failed: %s", ", ".join(failed[NAME]), reason)
            try:
                return self._postprocess_failed(engine, failed)
            except Exception as again:  # even the fallback cannot be written (e.g. the name is too long)
                reason = f"{reason}; no fallback written either: {describe_error(again)}"
                logger.error("%s: %s", ", ".join(failed[NAME]), reason)
                engine.state.batch = [{**{key: values[i] for key, values in failed.items()}, ERROR: reason}
                                      for i in range(len(failed[NAME]))]
                engine.state.output = [{} for _ in failed[NAME]]
                return engine.state.output

    @staticmethod
    def _postprocess_failed(engine, batchdata):
        engine.state.batch = batchdata
        engine.state.output = {"failed": torch.ones(len(batchdata[ERROR]))}
        # decollation and postprocessing (the writers) run on this event, as after a forward pass
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
