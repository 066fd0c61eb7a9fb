"""A corpus of hostile inputs for the inference: what a MOOD input folder might hold besides clean scans, each
with the outcome the bundle promises (``scored``: an output is written; ``failed``: the case is named with its
reason, and in sample mode gets the fallback score; ``skipped``: not a scan, named in the log). Small sizes; the
large claims are headers only.

    PYTHONPATH=bundle:. python -m tools.hostile_inputs --output_dir DIR [--size 32]

Writes the files into DIR and prints the table (name -> kind, outcome) as JSON; the tests run the MOOD run
scripts on it (tests/test_reliability.py); the model card names it ("How to infer").
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["CORPUS", "LONG_NAME", "claim_header", "gzip_bomb", "nan_sform_nii", "write_hostile_corpus"]

LONG_NAME = "l" * (255 - len(".nii.gz")) + ".nii.gz"  # a legal file name whose "<name>.txt" is one byte too long

# name -> (what it is, outcome)
CORPUS: dict[str, tuple[str, str]] = {
    "good.nii.gz": ("a clean scan", "scored"),
    "int16.nii.gz": ("integer intensities", "scored"),
    "odd shape with spaces.nii.gz": ("odd shape, anisotropic spacing, spaces in the name", "scored"),
    "constant.nii.gz": ("a constant image", "scored"),
    "nan_inf.nii.gz": ("NaN and +-Inf voxels", "scored"),
    "trailing_one.nii": ("4D with one volume, uncompressed", "scored"),
    "slab.nii.gz": ("one slice thick", "scored"),
    "nan_sform.nii": ("a NaN sform (nibabel cannot decompose it)", "scored"),
    "tiny_scale.nii.gz": ("intensities x 1e-12, uncompressed despite the .gz name", "scored"),
    "huge_scale.nii": ("float64 intensities x 1e300 (Inf if cast to float32 first)", "scored"),
    "tiny_float64.nii": ("float64 intensities x 1e-300 (zeros if cast to float32 first)", "scored"),
    "outliers.nii.gz": ("float64 with two voxels at +-1e300", "scored"),
    "gzip_bomb.nii.gz": ("a clean scan followed by 4 GB of gzipped zeros (only the header's claim is read)",
                         "scored"),
    "trailing_bytes.nii.gz": ("a clean scan followed by bytes that are not gzip (zlib never reads them)", "scored"),
    "bad_checksum.nii.gz": ("a clean scan whose gzip trailer holds a wrong checksum (zlib never reads it)", "scored"),
    "really_gzipped.nii": ("gzip-compressed despite the .nii name", "scored"),
    "UPPER.NII.GZ": ("an upper-case suffix", "scored"),
    "..nii.gz": ("a name that is nearly all suffix", "scored"),
    "flipped_axes.nii.gz": ("a left-handed affine (flipped axis)", "scored"),
    "corrupt.nii.gz": ("gzip of text", "failed"),
    "empty.nii.gz": ("an empty file", "failed"),
    "flat.nii.gz": ("a 2D image", "failed"),
    "series.nii.gz": ("4D with three volumes", "failed"),
    "huge_claim.nii.gz": ("a tiny file whose header claims 1200^3 float32 (6.9 GB)", "failed"),
    "bomb_claim.nii": ("an uncompressed header claiming 1600^3 over a few bytes (a sparse-file bomb)", "failed"),
    "truncated.nii": ("an uncompressed scan cut in half", "failed"),
    "truncated.nii.gz": ("a gzip stream cut in half", "failed"),
    "gone.nii.gz": ("a broken symbolic link", "failed"),
    "loop.nii.gz": ("a symbolic link to itself", "failed"),
    LONG_NAME: ("a 255-byte name: its sample file name is too long", "scored in pixel, failed in sample"),
    "notes.txt": ("not a scan", "skipped"),
    "pair.hdr": ("half of an Analyze/NIfTI pair", "skipped"),
    "pair.img": ("the other half", "skipped"),
}


def nan_sform_nii(volume: np.ndarray) -> bytes:
    """An uncompressed NIfTI of ``volume`` whose sform is NaN (MONAI's reader falls back to a finite affine,
    nibabel's does not)."""
    raw = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]))
    header["srow_x"] = header["srow_y"] = header["srow_z"] = np.nan
    header["sform_code"] = 1
    return header.binaryblock + raw[348:]


def claim_header(shape: tuple[int, ...]) -> bytes:
    """A NIfTI header claiming ``shape`` float32, followed by a few bytes of data only."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    return header.binaryblock + b"\0" * 4 + b"\0" * 4096


def gzip_bomb(nifti: bytes, inflated_gib: int = 4) -> bytes:
    """``nifti`` gzipped and followed by gzip members of zeros that inflate to ``inflated_gib`` GiB (each
    member is the same 64 MiB of zeros, compressed once): a few MB on disk."""
    zeros = gzip.compress(bytes(64 << 20), compresslevel=9)
    return gzip.compress(nifti) + zeros * (inflated_gib * 16)


def write_hostile_corpus(folder: str | os.PathLike, size: int = 32, seed: int = 0) -> dict[str, dict]:
    """Write :data:`CORPUS` into ``folder`` (created); returns ``{name: {"kind", "outcome"}}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    inside = sum(a**2 for a in axes) < 0.7
    volume = np.where(inside, 100 + 20 * rng.standard_normal((size,) * 3), 0).astype(np.float32)

    def save(array: np.ndarray, name: str, affine: np.ndarray | None = None) -> None:
        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), folder / name)

    save(volume, "good.nii.gz")
    save((volume * 10).astype(np.int16), "int16.nii.gz")
    save(volume[: size - 3, : size - 5, : size - 7].copy(), "odd shape with spaces.nii.gz", np.diag([0.7, 1.3, 3, 1]))
    save(np.full((20, 20, 20), 7.0, np.float32), "constant.nii.gz")
    broken = volume.copy()
    broken[2:5, 2:5, 2:5], broken[6, 6, 6], broken[7, 7, 7] = np.nan, np.inf, -np.inf
    save(broken, "nan_inf.nii.gz")
    save(volume[..., None], "trailing_one.nii")
    save(volume[:, :, size // 2 : size // 2 + 1].copy(), "slab.nii.gz")
    (folder / "nan_sform.nii").write_bytes(nan_sform_nii(volume))
    (folder / "tiny_scale.nii.gz").write_bytes(nib.Nifti1Image(volume * 1e-12, np.eye(4)).to_bytes())
    save(volume.astype(np.float64) * 1e300, "huge_scale.nii")
    save(volume.astype(np.float64) * 1e-300, "tiny_float64.nii")
    outliers = volume.astype(np.float64)
    outliers[3, 3, 3], outliers[4, 4, 4] = 1e300, -1e300
    save(outliers, "outliers.nii.gz")
    (folder / "gzip_bomb.nii.gz").write_bytes(gzip_bomb(nib.Nifti1Image(volume, np.eye(4)).to_bytes()))
    (folder / "trailing_bytes.nii.gz").write_bytes((folder / "good.nii.gz").read_bytes() + b"padding" * 40)
    wrong_checksum = bytearray((folder / "good.nii.gz").read_bytes())
    wrong_checksum[-8] ^= 0xFF  # the CRC-32 of the gzip trailer
    (folder / "bad_checksum.nii.gz").write_bytes(bytes(wrong_checksum))
    (folder / "really_gzipped.nii").write_bytes((folder / "good.nii.gz").read_bytes())
    (folder / "UPPER.NII.GZ").write_bytes((folder / "good.nii.gz").read_bytes())
    (folder / "..nii.gz").write_bytes((folder / "good.nii.gz").read_bytes())
    save(volume, "flipped_axes.nii.gz", np.diag([-1.0, 1.0, 1.0, 1.0]))
    (folder / "corrupt.nii.gz").write_bytes(gzip.compress(b"not a nifti" * 20))
    (folder / "empty.nii.gz").write_bytes(b"")
    save(volume[:, :, 0].copy(), "flat.nii.gz")
    save(np.stack([volume] * 3, -1), "series.nii.gz")
    (folder / "huge_claim.nii.gz").write_bytes(gzip.compress(claim_header((1200, 1200, 1200))))
    (folder / "bomb_claim.nii").write_bytes(claim_header((1600, 1600, 1600)))
    whole = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    (folder / "truncated.nii").write_bytes(whole[: len(whole) // 2])
    compressed = (folder / "good.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(compressed[: len(compressed) // 2])
    for name, target in (("gone.nii.gz", "nowhere.nii.gz"), ("loop.nii.gz", "loop.nii.gz")):
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(folder / target)
    (folder / LONG_NAME).write_bytes(compressed)
    (folder / "notes.txt").write_text("not a scan\n")
    pair = nib.Nifti1Pair(volume, np.eye(4))
    nib.save(pair, folder / "pair.img")
    return {name: {"kind": kind, "outcome": outcome} for name, (kind, outcome) in CORPUS.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    corpus = write_hostile_corpus(args.output_dir, args.size)
    print(json.dumps(corpus, indent=1))
    return corpus


if __name__ == "__main__":
    main()
