"""MONAI Deploy operators around the bundle's Predictor (:class:`scripts.inference.predictor.Predictor`, built from
the bundle's configs for the models' own plan, once, by :class:`BundleInference`): each operator runs one of its
steps on one case at a time.

    ScanLoaderOperator --case--> EnsembleInferenceOperator --case--> MoodWriterOperator
    Predictor.preprocess          Predictor.infer                     Predictor.postprocess (mode both): the score
    (reading, preprocessing)      (the fold ensemble, its inferer)    -> OUT/sample/<name>.txt, the map
                                                                      -> OUT/pixel/<name>

The anomaly map is written by the bundle's own writer, as the bundle writes it (float16 values in a float32 NIfTI by
default; the SDK's MonaiBundleInferenceOperator would cast image outputs to uint8).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent


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
    from scripts.io.files import MOOD_DATASETS  # importable once find_bundle_root put the bundle on the path

    dataset = dataset or "brain"
    if dataset not in MOOD_DATASETS:
        raise ValueError(f"dataset must be one of {MOOD_DATASETS} (MOOD_DATASET), got {dataset!r}")
    return path, dataset


class BundleInference:
    """The bundle's Predictor for one dataset and the cases of the input folder, made once."""

    def __init__(self, bundle_root: Path, dataset: str, models_dir: Path, input_dir: Path, output_dir: Path,
                 model_format: str = "pytorch", allow_partial_ensemble: bool = False) -> None:
        # importable once the bundle root is known
        from scripts.inference.predictor import Predictor, bundle_config
        from scripts.io.files import MODEL_SUFFIXES

        if model_format not in MODEL_SUFFIXES:
            raise ValueError(f"MOOD_MODEL_FORMAT must be one of {sorted(MODEL_SUFFIXES)}, got {model_format!r}")
        config = bundle_config(dataset, models_dir, bundle_root, dataset_dir=str(input_dir),
                               output_dir=str(output_dir), mode="both", pixel_output_dir=str(output_dir / "pixel"),
                               sample_output_dir=str(output_dir / "sample"), model_format=model_format,
                               allow_partial_ensemble=allow_partial_ensemble)
        config.get_parsed_content("initialize")  # the bundle's own start-up (determinism, argument checks)
        self.predictor = Predictor.from_config(config)
        self.cases = config.get_parsed_content("inputs")


class ScanLoaderOperator(Operator):
    """Emits one case per call: the Predictor's ``preprocess`` of the next input (reading, the overlay's preprocessing
    and normalisation). An unreadable scan becomes an item with its ``error``, never an exception."""

    def __init__(self, fragment: Fragment, *args, bundle: BundleInference, **kwargs) -> None:
        self.bundle = bundle
        self.index = 0
        super().__init__(fragment, *args, **kwargs)  # last, as the SDK requires

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("case")

    def compute(self, op_input, op_output, context) -> None:
        case = self.bundle.predictor.preprocess(self.bundle.cases[self.index])
        case["started"] = time.perf_counter()  # after reading, as the progress lines have always counted
        self.index += 1
        op_output.emit(case, "case")


class EnsembleInferenceOperator(Operator):
    """Adds ``pred`` (anomaly probabilities on the working grid) with the Predictor's ensemble; a case whose pass
    fails becomes a failed case, never an exception."""

    def __init__(self, fragment: Fragment, *args, bundle: BundleInference, **kwargs) -> None:
        self.bundle = bundle
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("case")
        spec.output("case")

    def compute(self, op_input, op_output, context) -> None:
        case = op_input.receive("case")
        started = case.pop("started")
        case = self.bundle.predictor.infer(case)
        case["started"] = started
        op_output.emit(case, "case")


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
        started = case.pop("started")
        name, index = case["name"], self.done + len(self.failed) + 1
        scored = self.bundle.predictor.postprocess(case)
        if scored.get("error"):
            self.failed.append(name)
            print(f"[{index}/{self.total}] {name}: FAILED: {scored['error']}", flush=True)
        else:
            self.done += 1
            print(f"[{index}/{self.total}] {name}: {time.perf_counter() - started:.1f} s "
                  f"score {scored['score']:.4f}", flush=True)
        if index == self.total:
            print(f"summary: {self.done} done, {len(self.failed)} failed"
                  + (f"; failed: {self.failed}" if self.failed else ""), flush=True)
