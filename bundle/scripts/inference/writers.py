"""Post-processing of the anomaly maps into the MOOD outputs (MOOD challenge submission format,
github.com/MIC-DKFZ/mood): the pixel map as a NIfTI on the input's grid, and the sample score, one float in [0, 1]
per scan, aggregated from the map. MONAI-style dictionary transforms, run by the inference workflow's evaluator on
every decollated case. Both work on the map where it is (the GPU when there is one): the pixel writer cleans and
quantises it there and copies it to the host once."""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.io.cases import readable_path
from scripts.io.files import is_scan, write_atomically
from scripts.io.keys import ERROR, NAME, PATH, SERIES_UID
from scripts.io.nifti import read_tolerantly, reverse_axes
from scripts.io.radiographs import read_for_display
from scripts.scores import sample_score

logger = logging.getLogger(__name__)


# how a pixel map can be stored (make bench-inference measures each: seconds, size, MOOD's AP):
# - float16: the map rounded to float16, stored as float32 (NIfTI-1 has no float16). MOOD's evaluator reads maps as
#   float16, so it sees exactly the float32 map's values (the same AP), and the zeroed low bytes compress well;
# - uint16: round(65535 p) with scale slope 1/65535: fewer bytes, but below p = 1/64 its step is coarser than
#   float16's, so maps of mostly tiny probabilities lose some of the AP the evaluator would see;
# - float32: the map's own values.
PIXEL_MAP_DTYPES = ("float16", "uint16", "float32")


DEFAULT_PIXEL_MAP_DTYPE = "float16"


_UINT16_STEPS = 65535


def _remove_stale(path: Path) -> None:
    """A case that fails now must not leave an earlier run's output in place."""
    if path.is_file() or path.is_symlink():
        path.unlink()
        logger.warning("%s: removed the output of an earlier run", path)


def _plain_tensor(x) -> torch.Tensor:
    """The map as a plain float tensor where it is (no copy to the host)."""
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    return x.detach().float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))


def _stored_values(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """``values`` (probabilities in [0, 1], changed in place) as ``dtype`` stores them (:data:`PIXEL_MAP_DTYPES`)."""
    if dtype == "uint16":
        return values.mul_(_UINT16_STEPS).round_().to(torch.uint16)
    if dtype == "float16":
        return values.copy_(values.half())
    return values


def _finite_affine(source, pred) -> np.ndarray:
    """The input's affine, or when its header's is not finite (a NaN sform) the one MONAI's reader fell back to,
    which the map carries after the inverse transforms."""
    affine = np.asarray(source.affine, dtype=np.float64)
    if np.isfinite(affine).all():
        return affine
    if isinstance(pred, MetaTensor) and np.isfinite(np.asarray(pred.affine)).all():
        return np.asarray(pred.affine, dtype=np.float64)
    return np.eye(4)


class _LoadedGrid:
    """The grid a DICOM series (or a 2D image: PNG, JPEG, DICOM) was loaded on, as the map carries it after the
    inverse transforms: its shape, its affine (RAS; MONAI's PydicomReader converts DICOM's LPS) and a NIfTI header
    for it. The coordinates are the patient's, so both NIfTI codes say "scanner"; a sheared affine (a gantry tilt),
    which the qform cannot hold, only in the sform, so that no viewer reads an approximation."""

    def __init__(self, pred) -> None:
        if not isinstance(pred, MetaTensor):
            raise ValueError("the map carries no grid (not a MetaTensor) to write a DICOM series' map on")
        self.shape = tuple(int(n) for n in pred.shape[1:])
        self.affine = np.asarray(pred.affine, dtype=np.float64)
        self.header = nib.Nifti1Header()
        self.header.set_data_shape(self.shape)
        self.header.set_xyzt_units("mm")
        self.header.set_sform(self.affine, code="scanner")
        columns = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        if np.allclose(columns.T @ columns, np.eye(3), atol=1e-5):
            self.header.set_qform(self.affine, code="scanner")


class WritePixelMapd(MapTransform):
    """Writes ``<output_dir>/<input name>``: the anomaly map as a NIfTI with the input file's shape and affine (MOOD
    pixel task; for a DICOM series (an item with a ``series_uid``) or a 2D image, the shape and affine of the grid
    MONAI loaded it on, which the map carries after the inverse transforms: Columns x Rows (x slices in InstanceNumber
    order, in RAS, :mod:`scripts.io.dicom`)), stored as ``dtype`` says (:data:`PIXEL_MAP_DTYPES`): ``float16`` the
    probabilities rounded to float16 in a float32 file, ``uint16`` round(65535 p) with scale slope 1/65535,
    ``float32`` the probabilities themselves. Expects the map already brought back to the input grid; it is put in
    NIfTI's voxel order, cleaned (NaN to 0, clamped to [0, 1]) and rounded on its own device, and copied to the host
    once."""

    def __init__(self, keys: str = "pred", output_dir: str | Path = ".", dtype: str = DEFAULT_PIXEL_MAP_DTYPE,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        if dtype not in PIXEL_MAP_DTYPES:
            raise ValueError(f"pixel map dtype must be one of {PIXEL_MAP_DTYPES}, got {dtype!r}")
        self.output_dir = Path(output_dir)
        self.dtype = dtype

    def _host_values(self, pred, shape: tuple[int, ...]) -> np.ndarray:
        values = _plain_tensor(pred)
        if values.numel() != int(np.prod(shape)):
            raise ValueError(f"map of shape {tuple(values.shape)} does not fit the input's {shape}")
        # NIfTI's voxel order (first axis fastest) made here, on the map's device, not by nibabel voxel by voxel; the
        # copy it makes is then cleaned and rounded in place
        values = reverse_axes(values.reshape(shape))
        values = _stored_values(torch.nan_to_num_(values, nan=0.0).clamp_(0.0, 1.0), self.dtype)
        return values.cpu().numpy().T

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(ERROR):
            logger.error("%s: no pixel map written: %s", d[NAME], d[ERROR])
            _remove_stale(self.output_dir / d[NAME])
            return d
        # the header only; a DICOM series' or a 2D image's grid is the map's own (below)
        source = (None if d.get(SERIES_UID) or not is_scan(d[PATH])
                  else read_tolerantly(lambda: nib.load(readable_path(d[PATH])), d[NAME]))
        for key in self.key_iterator(d):
            source = source if source is not None else _LoadedGrid(d[key])
            try:
                values = self._host_values(d[key], tuple(source.shape))
            except ValueError as err:
                raise ValueError(f"{d[NAME]}: {err}") from None
            header = source.header.copy()
            header.set_data_dtype(values.dtype)
            out = nib.Nifti1Image(values, _finite_affine(source, d.get(key)), header)
            # set after the image is made (making it resets the scaling): nibabel then writes the values as they
            # are, with this slope, instead of choosing its own scaling
            out.header.set_slope_inter(1.0 / _UINT16_STEPS if self.dtype == "uint16" else 1.0, 0.0)
            d["written"] = str(write_atomically(self.output_dir / d[NAME], lambda tmp, image=out: nib.save(image, tmp)))
        return d


class WriteSampleScored(MapTransform):
    """Writes ``<output_dir>/<input name>.txt`` with one float in [0, 1] (MOOD sample task), aggregated from the
    working-grid map by ``method``, the plan's ``sample_score`` record or a top fraction (:func:`sample_score`,
    the same aggregation as training's validation), or the ``score`` that
    :class:`scripts.inference.worklist.SummariseMapd` put in the case before (the same method, computed once). A
    scan that could not be read gets ``fallback_score``."""

    def __init__(self, keys: str = "pred", output_dir: str | Path = ".", method: float | Mapping = 1e-2,
                 fallback_score: float = 1.0, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= fallback_score <= 1.0:
            raise ValueError(f"fallback_score must be in [0, 1], got {fallback_score}")
        self.output_dir = Path(output_dir)
        self.method = method
        self.fallback_score = fallback_score

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(ERROR):
            logger.error("%s: could not be read (%s); writing the fallback score %s", d[NAME], d[ERROR],
                         self.fallback_score)
            score = self.fallback_score
        elif d.get("score") is not None:  # summarised already
            score = min(max(float(d["score"]), 0.0), 1.0)
        else:
            key = self.first_key(d)
            values = torch.nan_to_num(_plain_tensor(d[key]), nan=0.0)  # on the map's device
            score = float(sample_score(values, self.method).clamp(0.0, 1.0))
        if not math.isfinite(score):
            score = self.fallback_score
        path = write_atomically(self.output_dir / f"{d[NAME]}.txt", lambda tmp: tmp.write_text(f"{score:.6f}\n"))
        d["score"], d["written"] = score, str(path)
        return d


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
