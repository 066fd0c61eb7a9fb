"""Fast NIfTI reading and writing: gzip through ISA-L (python-isal, github.com/pycompression/python-isal) instead
of the standard library's zlib, and the change between NIfTI's voxel order (first axis fastest, "Fortran") and
torch's (last axis fastest) made in cache-sized blocks.

nibabel chooses a file's opener by its suffix from ``ImageOpener.compress_ext_map``, the hook nibabel documents for
other compressors; :func:`use_fast_gzip` puts ISA-L's gzip file there. The files stay standard gzip streams (any
zlib, nibabel, ITK-SNAP or 3D Slicer reads them) and are as deterministic as nibabel's own (no file name, time 0).
ISA-L compresses a MOOD 512^3 map several times faster than zlib at about the same size (``make bench-inference``
measures the writers) and decompresses faster too. Importing ``scripts`` calls it, so every
workflow, the evaluation and the tools use it; ``MOOD_FAST_GZIP=0`` keeps nibabel's own.

Reordering a 512^3 volume with NumPy (``np.ascontiguousarray``, as MONAI's reader does) takes seconds: every voxel
is fetched from far away. :func:`reverse_axes` copies slabs a few voxels thick instead, several times faster;
:class:`ContiguousNibabelReader` loads through it and the pixel writer writes through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from monai.data import NibabelReader
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener

__all__ = ["ContiguousNibabelReader", "fast_gzip_in_use", "read_tolerantly", "reverse_axes", "use_fast_gzip",
           "use_fast_gzip_unless_disabled"]

logger = logging.getLogger(__name__)

# nibabel's own opener for .gz, restored by use_fast_gzip(False)
_NIBABEL_GZIP = ImageOpener.compress_ext_map[".gz"]
_ARGUMENTS = ("mode", "compresslevel", "mtime", "keep_open")
_THREAD = threading.local()  # .zlib: this thread reads with nibabel's own gzip (read_tolerantly)
T = TypeVar("T")


@contextlib.contextmanager
def _zlib_in_this_thread():
    _THREAD.zlib = True
    try:
        yield
    finally:
        _THREAD.zlib = False


def _isal_gzip_open(filename: str, mode: str = "rb", compresslevel: int = 1, mtime: int = 0,
                    keep_open: bool = False):
    """nibabel's ``gzip_open`` with ISA-L: a reader, or a writer that stores no file name and ``mtime`` (0), as
    nibabel's ``DeterministicGzipFile`` does. zlib's levels 1-9 map onto ISA-L's 0-3 (1 stays 1: about zlib 1's
    size, several times faster). ``keep_open`` only matters to indexed_gzip readers."""
    from isal import igzip, isal_zlib

    if getattr(_THREAD, "zlib", False):
        return _NIBABEL_GZIP[0](filename, mode, compresslevel, mtime, keep_open)
    mode = mode if "b" in mode else f"{mode}b"
    if mode.startswith("r"):
        return igzip.IGzipFile(filename, mode)
    level = min(max(int(compresslevel), isal_zlib.ISAL_BEST_SPEED), isal_zlib.ISAL_BEST_COMPRESSION)
    raw = open(filename, mode)
    try:
        gzip_file = igzip.IGzipFile(filename="", mode=mode, compresslevel=level, fileobj=raw, mtime=mtime)
    except BaseException:
        raw.close()
        raise
    gzip_file.myfileobj = raw  # closed with the gzip file, as GzipFile does for files it opened itself
    return gzip_file


def use_fast_gzip(enabled: bool = True) -> bool:
    """Read and write ``.gz`` images with ISA-L (``enabled``) or with nibabel's own opener; returns whether ISA-L
    is in use now (False when python-isal is not installed: nibabel's opener stays, a little slower)."""
    if enabled:
        try:
            import isal.igzip  # noqa: F401
        except ImportError:
            logger.debug("python-isal is not installed: nibabel's gzip stays")
            enabled = False
    ImageOpener.compress_ext_map[".gz"] = (_isal_gzip_open, _ARGUMENTS) if enabled else _NIBABEL_GZIP
    return enabled


def fast_gzip_in_use() -> bool:
    """Whether nibabel reads and writes ``.gz`` images with ISA-L now."""
    return ImageOpener.compress_ext_map[".gz"][0] is _isal_gzip_open


def use_fast_gzip_unless_disabled(variable: str = "MOOD_FAST_GZIP") -> bool:
    """:func:`use_fast_gzip` unless the environment variable ``variable`` is ``0``."""
    return use_fast_gzip(os.environ.get(variable, "1") != "0")


def reverse_axes(tensor: torch.Tensor, slab: int = 16) -> torch.Tensor:
    """A new C-ordered tensor holding ``tensor.permute(reversed axes)``: the same voxels in the other memory order
    (NIfTI's first-axis-fastest order viewed by torch, or the reverse). On the CPU it is made ``slab`` planes of the
    first axis at a time (each slab's reads and writes stay within the cache, where one strided copy of a 512^3
    volume fetches every voxel from far away); on a GPU in one go. Never a view of ``tensor``: the caller may change
    it in place."""
    order = tuple(reversed(range(tensor.ndim)))
    out = torch.empty(tuple(reversed(tensor.shape)), dtype=tensor.dtype, device=tensor.device)
    if tensor.device.type != "cpu" or tensor.ndim < 2:
        return out.copy_(tensor.permute(order))
    tensor = tensor.contiguous()
    for start in range(0, tensor.shape[0], slab):
        out[..., start:start + slab] = tensor[start:start + slab].permute(order)
    return out


def read_tolerantly(read: Callable[[], T], name: str = "") -> T:
    """``read()``, and when it fails while ISA-L is in use, ``read()`` again with nibabel's zlib in this thread.
    ISA-L reads ahead and checks what follows a gzip stream (its checksum, any bytes after it); zlib reads only the
    bytes an image needs, so a file nibabel has always read (e.g. with padding after the stream) still reads. A
    file neither reads raises zlib's error."""
    try:
        return read()
    except Exception as err:
        cause = _io_cause(err)
        if cause is None or not fast_gzip_in_use():
            raise
        with _zlib_in_this_thread():
            result = read()
        logger.warning("%s: read with zlib (ISA-L refused its gzip stream: %s)", name, cause)
        return result


def _io_cause(err: BaseException) -> BaseException | None:
    """The I/O error behind ``err`` (gzip.BadGzipFile is an OSError; nibabel wraps it in ImageFileError when it
    sniffs the header, MONAI's transforms in a RuntimeError), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (OSError, ImageFileError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class ContiguousNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` whose array is already C-ordered, reordered by :func:`reverse_axes`: MONAI would
    make NIfTI's first-axis-fastest array C-ordered with NumPy, several times slower for a MOOD volume. The values
    and the metadata are the same."""

    def get_data(self, img):
        data, meta = super().get_data(img)
        if (isinstance(data, np.ndarray) and data.ndim > 1 and data.dtype.isnative and data.flags.f_contiguous
                and not data.flags.c_contiguous):
            try:
                data = reverse_axes(torch.from_numpy(data.T)).numpy()
            except TypeError:  # a type torch does not hold: MONAI reorders it as usual
                pass
        return data, meta
