"""MONAI Deploy operators that run the bundle's own inference: the preprocessing, the fold ensemble and the MOOD
writers are the objects the bundle's configs declare (common.yaml + inference.yaml + the dataset overlay; the
network and the preprocessing follow the models' own plan), parsed once by
:class:`BundleInference`; the operators only move one case at a time between them.

    ScanLoaderOperator --case--> EnsembleInferenceOperator --case--> MoodWriterOperator
    the bundle's `dataset`         its `network` and `inferer`,        `postprocessing_both`: the score
    (LoadImaged, preprocessing)    as its evaluator runs them          -> OUT/sample/<name>.txt, the map
                                                                       -> OUT/pixel/<name>

The anomaly map is written by the bundle's own writer, as the bundle writes it (float16 values in a float32 NIfTI by
default; the SDK's MonaiBundleInferenceOperator would cast image outputs to uint8).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.data import decollate_batch, list_data_collate
from monai.deploy.core import Fragment, Operator, OperatorSpec

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
DATASETS = ("brain", "abdom")


def find_bundle_root(bundle_root: str | Path | None = None) -> Path:
    """The bundle folder (``configs/`` and ``scripts/``): ``bundle_root`` if given; else the checkout's ``bundle/``
    next to ``deploy/``; else wherever the bundle's ``scripts`` package is importable from (in a MAP,
    ``monai-deploy package --add bundle`` puts it in /opt/holoscan/lib, on the PYTHONPATH)."""
    if bundle_root is None and (APP_DIR.parent / "bundle" / "configs").is_dir():
        bundle_root = APP_DIR.parent / "bundle"
    if bundle_root is None:
        try:
            import scripts
        except ImportError as err:
            raise FileNotFoundError("cannot find the MONAI bundle: set MOOD_BUNDLE_ROOT to its folder") from err
        bundle_root = Path(scripts.__file__).resolve().parents[1]
    root = Path(bundle_root).resolve()
    if not (root / "configs" / "inference.yaml").is_file():
        raise FileNotFoundError(f"{str(root)!r} is not the bundle: it has no configs/inference.yaml")
    if str(root) not in sys.path:  # the bundle's custom code is imported as `scripts` (MONAI bundle convention)
        sys.path.insert(0, str(root))
    return root


def resolve_models(models_path: str | Path, dataset: str | None) -> tuple[Path, str]:
    """``(models_dir, dataset)`` for the bundle's config from the app's model path: either a folder of dataset
    subfolders (``bundle/models``; the dataset is ``dataset``, default brain) or one dataset's folder of fold
    models (``bundle/models/abdom``; the dataset is its name unless given)."""
    path = Path(models_path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a folder")
    if any(path.glob("fold_*")):
        dataset = dataset or path.name
        if dataset != path.name:
            raise ValueError(f"model folder {str(path)!r} holds {path.name!r} models, not {dataset!r}")
        path = path.parent
    dataset = dataset or "brain"
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS} (MOOD_DATASET), got {dataset!r}")
    return path, dataset


class BundleInference:
    """The bundle's inference config for one dataset, parsed once: the objects the operators run."""

    def __init__(self, bundle_root: Path, dataset: str, models_dir: Path, input_dir: Path, output_dir: Path,
                 model_format: str = "pytorch", allow_partial_ensemble: bool = False) -> None:
        from scripts.io.files import MODEL_SUFFIXES  # importable once the bundle root is known

        if model_format not in MODEL_SUFFIXES:
            raise ValueError(f"MOOD_MODEL_FORMAT must be one of {sorted(MODEL_SUFFIXES)}, got {model_format!r}")
        configs = bundle_root / "configs"
        self.parser = ConfigParser()
        self.parser.read_meta(str(configs / "metadata.json"))
        self.parser.read_config([str(configs / name) for name in ("common.yaml", "inference.yaml", f"{dataset}.yaml")])
        self.parser.update({"bundle_root": str(bundle_root), "models_dir": str(models_dir),
                            "dataset_dir": str(input_dir), "output_dir": str(output_dir), "mode": "both",
                            "pixel_output_dir": str(output_dir / "pixel"),
                            "sample_output_dir": str(output_dir / "sample"),
                            "model_format": model_format, "allow_partial_ensemble": allow_partial_ensemble})
        self.parser.get_parsed_content("initialize")  # the bundle's own start-up (determinism, argument checks)
        self.cases = self.parser.get_parsed_content("dataset")
        self.network = self.parser.get_parsed_content("network")
        self.inferer = self.parser.get_parsed_content("inferer")
        self.device = self.parser.get_parsed_content("device")
        self.amp = bool(self.parser.get_parsed_content("amp"))
        self.writer = self.parser.get_parsed_content("postprocessing")  # both outputs of the one pass


class ScanLoaderOperator(Operator):
    """Emits one case per call: the bundle's ``dataset`` item (LoadImaged and the overlay's
    preprocessing and normalisation). An unreadable scan becomes an item with its ``error``, never an exception."""

    def __init__(self, fragment: Fragment, *args, bundle: BundleInference, **kwargs) -> None:
        self.bundle = bundle
        self.index = 0
        super().__init__(fragment, *args, **kwargs)  # last, as the SDK requires

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("case")

    def compute(self, op_input, op_output, context) -> None:
        case = self.bundle.cases[self.index]
        case["started"] = time.perf_counter()
        self.index += 1
        op_output.emit(case, "case")


class EnsembleInferenceOperator(Operator):
    """Runs the bundle's fold ensemble through its inferer, as the bundle's evaluator does (eval mode, no
    gradients, autocast when ``amp``), and adds ``pred`` (anomaly probabilities on the working grid)."""

    def __init__(self, fragment: Fragment, *args, bundle: BundleInference, **kwargs) -> None:
        self.bundle = bundle
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("case")
        spec.output("case")

    def compute(self, op_input, op_output, context) -> None:
        case = op_input.receive("case")
        if not case.get("error"):
            started = case["started"]
            try:
                case = self.predict(case)
            except Exception as err:  # one case's failure never stops the others: the writer names it
                logger.exception("%s: the ensemble failed", case["name"])
                case = {**case, "started": started, "error": f"network: {type(err).__name__}: {err}"}
        op_output.emit(case, "case")

    def predict(self, case: dict) -> dict:
        bundle = self.bundle
        started = case.pop("started")
        batch = list_data_collate([case])
        image = batch["image"].to(bundle.device)
        with torch.no_grad(), torch.autocast(bundle.device.type, enabled=bundle.amp):
            pred = bundle.inferer(image, bundle.network)
        # what the evaluator's postprocessing sees: the batch item merged with its output
        item = decollate_batch({**batch, "image": image, "pred": pred}, detach=True)[0]
        item["started"] = started
        return item


class MoodWriterOperator(Operator):
    """Writes both MOOD outputs of each case with the bundle's post-processing of ``--mode both``: the sample score
    (``OUT/sample/<name>.txt``, from the working-grid map) and the pixel map brought back to the input grid
    (``OUT/pixel/<name>``). A case that fails there gets the outputs of a failed case (the fallback score, no map),
    as in the bundle. Prints one line per case and a summary after the last."""

    def __init__(self, fragment: Fragment, *args, bundle: BundleInference, total: int, **kwargs) -> None:
        self.bundle = bundle
        self.total = total
        self.done, self.failed = 0, []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("case")

    def compute(self, op_input, op_output, context) -> None:
        case = op_input.receive("case")
        name, index = case["name"], self.done + len(self.failed) + 1
        try:
            scored = self.bundle.writer(dict(case))
        except Exception as err:  # one case's failure never stops the others
            logger.exception("%s: writing its outputs failed", name)
            case = {"name": name, "image_path": case["image_path"], "started": case["started"],
                    "error": case.get("error") or f"{type(err).__name__}: {err}"}
            try:
                self.bundle.writer(dict(case))  # the fallback score; no map, and none of an earlier run
            except Exception:
                logger.exception("%s: not even the fallback outputs could be written", name)
            scored = {}
        if case.get("error"):
            self.failed.append(name)
            print(f"[{index}/{self.total}] {name}: FAILED: {case['error']}", flush=True)
        else:
            self.done += 1
            print(f"[{index}/{self.total}] {name}: {time.perf_counter() - case['started']:.1f} s "
                  f"score {scored['score']:.4f}", flush=True)
        if index == self.total:
            print(f"summary: {self.done} done, {len(self.failed)} failed"
                  + (f"; failed: {self.failed}" if self.failed else ""), flush=True)
