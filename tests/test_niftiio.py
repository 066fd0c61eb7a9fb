"""Fast NIfTI I/O (scripts.io.nifti): ISA-L's gzip behind nibabel writes standard, deterministic gzip files with the
same voxels; the blocked reordering equals torch's permute; the reader gives MONAI's array and metadata; the
pixel writer's uint16 maps keep MOOD's AP."""

from __future__ import annotations

import gzip
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import NibabelReader
from nibabel.filebasedimages import ImageFileError

from scripts.evaluate import count_metrics, float16_bin_counts
from scripts.inference.writers import WritePixelMapd
from scripts.io.nifti import ContiguousNibabelReader, fast_gzip_in_use, read_tolerantly, reverse_axes, use_fast_gzip


@pytest.fixture
def nibabel_gzip():
    """nibabel's own gzip for the test, ISA-L again after it."""
    use_fast_gzip(False)
    yield
    use_fast_gzip(True)


def test_the_bundle_uses_isal_and_writes_standard_deterministic_gzip(tmp_path, nibabel_gzip):
    volume = np.random.default_rng(0).normal(size=(17, 12, 9)).astype(np.float32)
    image = nib.Nifti1Image(volume, np.diag([0.7, 1.1, 2.0, 1.0]))
    nib.save(image, tmp_path / "zlib.nii.gz")
    assert use_fast_gzip(True) and fast_gzip_in_use()
    nib.save(image, tmp_path / "isal.nii.gz")
    nib.save(image, tmp_path / "again.nii.gz")
    assert (tmp_path / "isal.nii.gz").read_bytes() == (tmp_path / "again.nii.gz").read_bytes()  # no name, no time
    # the standard library reads ISA-L's stream as the same uncompressed file nibabel's own writer made
    assert gzip.decompress((tmp_path / "isal.nii.gz").read_bytes()) == gzip.decompress(
        (tmp_path / "zlib.nii.gz").read_bytes())
    read = nib.load(tmp_path / "isal.nii.gz")  # read through ISA-L too
    assert np.array_equal(np.asanyarray(read.dataobj), volume) and np.allclose(read.affine, image.affine)
    assert not use_fast_gzip(False) and not fast_gzip_in_use()
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "isal.nii.gz").dataobj), volume)


@pytest.mark.parametrize("shape", [(37, 5, 19), (3, 40), (16, 16, 16, 2)])
@pytest.mark.parametrize("slab", [1, 4, 16])
def test_reverse_axes_is_permute_contiguous(shape, slab):
    tensor = torch.arange(int(np.prod(shape)), dtype=torch.int32).reshape(shape)
    expected = tensor.permute(tuple(reversed(range(len(shape))))).contiguous()
    result = reverse_axes(tensor, slab)
    assert result.is_contiguous() and torch.equal(result, expected)
    assert torch.equal(reverse_axes(tensor.transpose(0, 1).contiguous().transpose(0, 1), slab), expected)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.dtype(">f4")])
def test_contiguous_reader_gives_monai_reader_array_and_metadata(tmp_path, dtype):
    volume = np.random.default_rng(1).normal(size=(21, 18, 11)) * 100
    path = tmp_path / "scan.nii.gz"
    image = nib.Nifti1Image(volume.astype(dtype), np.diag([0.8, 0.9, 2.5, 1.0]))
    nib.save(image, path)
    monai_reader, reader = NibabelReader(), ContiguousNibabelReader()
    monai_array, monai_meta = monai_reader.get_data(monai_reader.read(str(path)))
    array, meta = reader.get_data(reader.read(str(path)))
    assert np.array_equal(array, monai_array) and array.dtype == monai_array.dtype
    assert array.flags.c_contiguous or not np.dtype(dtype).isnative  # a big-endian array is left to MONAI
    assert np.array_equal(meta["affine"], monai_meta["affine"]) and meta.keys() == monai_meta.keys()


@pytest.mark.parametrize("background", [-4.0, -9.0], ids=["p~2e-2", "p~1e-4"])
def test_stored_maps_and_moods_average_precision(tmp_path, background):
    """As MOOD's evaluator reads them (float16): a float16-stored map is exactly the float32 map (the same counts
    per score bin, the same AP); a uint16 one is within half a step of 1/65535, which merges the tiny
    probabilities float16 keeps apart, so its AP may move. NaN and values outside [0, 1] are cleaned."""
    rng = np.random.default_rng(2)
    shape = (40, 36, 30)
    label = np.zeros(shape, bool)
    label[10:20, 8:18, 5:15] = True
    logits = rng.normal(background, 1.5, shape) + 3.5 * label
    prob = torch.sigmoid(torch.from_numpy(logits)).float()
    source = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.diag([1.2, 1.0, 0.8, 1.0])), source)
    case = {"name": "scan.nii.gz", "image_path": str(source), "error": ""}
    maps = {}
    for dtype in ("float32", "float16", "uint16"):
        dirty = prob.clone()[None]
        dirty[0, 0, 0, 0], dirty[0, 1, 0, 0], dirty[0, 2, 0, 0] = float("nan"), 1.5, -0.5
        WritePixelMapd(output_dir=tmp_path / dtype, dtype=dtype)({**case, "pred": dirty})
        written = nib.load(tmp_path / dtype / "scan.nii.gz")
        assert written.get_data_dtype() == np.dtype("uint16" if dtype == "uint16" else "float32")
        assert np.allclose(written.affine, nib.load(source).affine)
        maps[dtype] = np.asanyarray(written.dataobj)
        assert maps[dtype][0, 0, 0] == 0 and maps[dtype][1, 0, 0] == pytest.approx(1) and maps[dtype][2, 0, 0] == 0
    assert np.array_equal(maps["float32"][3:], prob.numpy()[3:])
    assert np.array_equal(maps["float16"], maps["float32"].astype(np.float16).astype(np.float32))
    assert np.abs(maps["uint16"] - maps["float32"]).max() <= 0.5 / 65535 + 1e-7
    counts = {k: float16_bin_counts(v, label)[:2] for k, v in maps.items()}
    assert all(np.array_equal(a, b) for a, b in zip(counts["float16"], counts["float32"]))
    ap = {k: count_metrics(*c)["average_precision"] for k, c in counts.items()}
    assert 0.05 < ap["float32"] < 0.99 and ap["float16"] == ap["float32"]
    with pytest.raises(ValueError, match="dtype must be one of"):
        WritePixelMapd(dtype="float64")


@pytest.mark.parametrize("damage", ["trailing_bytes", "bad_checksum"])
def test_a_stream_isal_refuses_is_read_with_zlib(tmp_path, damage):
    """zlib reads only the bytes an image needs; ISA-L also checks what follows: such a file reads as before."""
    volume = np.random.default_rng(3).normal(size=(12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "good.nii.gz")
    raw = bytearray((tmp_path / "good.nii.gz").read_bytes())
    if damage == "trailing_bytes":
        raw += b"not gzip" * 10
    else:
        raw[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    (tmp_path / "scan.nii.gz").write_bytes(bytes(raw))
    def read():
        reader = ContiguousNibabelReader()
        return reader.get_data(reader.read(str(tmp_path / "scan.nii.gz")))[0]

    with pytest.raises((OSError, ImageFileError)):  # ISA-L's own reader refuses it
        read()
    assert np.array_equal(read_tolerantly(read, "scan.nii.gz"), volume)
    assert fast_gzip_in_use()  # other threads and later reads keep ISA-L
    (tmp_path / "scan.nii.gz").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises((OSError, ImageFileError, EOFError)):  # a stream zlib cannot read either still fails
        read_tolerantly(read)


def test_prefetching_loader_loads_one_case_ahead_and_raises_its_errors():
    from scripts.inference.engine import PrefetchingDataLoader

    class Cases(torch.utils.data.Dataset):
        def __init__(self, failing: int | None = None):
            self.failing, self.loaded = failing, []

        def __len__(self):
            return 5

        def __getitem__(self, index):
            if index == self.failing:
                raise RuntimeError(f"case {index} cannot be collated")
            self.loaded.append(index)
            return {"index": index}

    cases = Cases()
    seen = []
    for batch in PrefetchingDataLoader(cases, batch_size=1):
        index = int(batch["index"][0])
        time.sleep(0.05)  # scoring it: the loader meanwhile loads the next case, and no further
        assert cases.loaded[-1] == min(index + 1, 4) and len(cases.loaded) <= index + 2
        seen.append(index)
    assert seen == [0, 1, 2, 3, 4]
    failing = Cases(failing=3)
    with pytest.raises(RuntimeError, match="case 3 cannot"):  # not a silently shorter run
        for _ in PrefetchingDataLoader(failing, batch_size=1):
            pass
