"""Behaviour kept bit for bit: the demo set (``tools.demo``'s toy cases, seed 0, at the side the shipped models were
trained on) scored with the shipped models gives exactly the maps and scores recorded in
``tests/fixtures/demo_outputs.json``, which were written by the code before the restructuring of 0.11.0 (one plan, one
Predictor, packages by concern). A change that alters any voxel of any map, or any score, fails here; a deliberate one
re-records the file (``python -m tests.test_identical_outputs --record``) and says why in its commit."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.io.files import MOOD_DATASETS

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "demo_outputs.json"
DATASETS = MOOD_DATASETS
# the demo's set (tools.demo: DEMO_SIZE 128, 6 cases, seed 0), fewer cases to keep CI fast: the toy generator makes
# each case from its own seed, so these are the demo's first cases (one normal, one anomalous: each pair has one)
CASES, SIZE, SEED = 2, 128, 0


def output_digests(folder: Path) -> dict:
    """Per output file: a map's stored voxel values (dtype and raw bytes, hashed), affine and shape; a score's text."""
    digests = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".txt"):
            digests[path.name] = path.read_text()
        elif path.name.endswith((".nii.gz", ".nii")):
            image = nib.load(path)
            values = np.asanyarray(image.dataobj.get_unscaled() if hasattr(image.dataobj, "get_unscaled")
                                   else image.dataobj)
            digests[path.name] = {
                "dtype": str(values.dtype), "shape": list(values.shape),
                "values_sha256": hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest(),
                "affine": np.asarray(image.affine, dtype=np.float64).round(6).tolist(),
                "slope": [float(v) if np.isfinite(v) else None for v in image.header.get_slope_inter()
                          if v is not None],
            }
    return digests


def score_demo_set(root: Path, dataset: str) -> Path:
    """The demo set of ``dataset`` under ``root``, scored for both tasks by the MOOD run scripts' body."""
    from tools.demo import run_script
    from tools.toy_data import write_toy_dataset

    write_toy_dataset(root / "data", dataset, n_train=0, n_toy=CASES, size=SIZE, seed=SEED)
    predictions = root / "predictions" / dataset
    run_script("both", dataset, root / "data" / dataset / "toy", predictions, quiet=True)
    return predictions


@pytest.mark.parametrize("dataset", DATASETS)
def test_demo_outputs_bit_identical(tmp_path, dataset):
    recorded = json.loads(FIXTURE.read_text())[dataset]
    got = output_digests(score_demo_set(tmp_path, dataset))
    assert sorted(got) == sorted(recorded)
    for name in recorded:
        assert got[name] == recorded[name], f"{dataset}/{name} differs from the recorded output"


def record(root: Path) -> None:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    digests = {dataset: output_digests(score_demo_set(root, dataset)) for dataset in DATASETS}
    FIXTURE.write_text(json.dumps(digests, indent=1) + "\n")
    print(FIXTURE)


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record(Path(tmp))
