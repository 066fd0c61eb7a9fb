"""The Predictor: the one per-case path of inference, behind every front end (the bundle's inference workflow,
``python -m scripts.predict`` and the MOOD run scripts on top of it, the MONAI Deploy app, calibration).

After nnU-Net's ``nnUNetPredictor`` (nnunetv2/inference/predict_from_raw_data.py) and anomalib's inferencers: built
once from a models folder (its plan says the network, the grid, the normalisation, the sample score and the
operating points; the bundle's configs declare the preprocessing and the writers), it scores one case
(:meth:`Predictor.predict_case`, or its three steps :meth:`~Predictor.preprocess`, :meth:`~Predictor.infer` and
:meth:`~Predictor.postprocess`) or a folder (:meth:`Predictor.predict_folder`), and gives the working-grid map of a
preprocessed scan (:meth:`Predictor.predict_map`, what calibration measures). A new kind of model plugs in as the
``network`` (anything that maps a preprocessed batch to anomaly probabilities: the fold ensemble of
:mod:`scripts.inference.ensemble`).

    predictor = Predictor.from_bundle("brain", models_dir="bundle/models", output_dir="out", mode="both")
    predictor.predict_folder("scans")             # every case: maps, scores, the worklist
    case = predictor.predict_case("scans/a.nii.gz")  # one: case["pred"] (input grid), case["score"], the summary
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.data import decollate_batch, list_data_collate

from scripts.cli import describe_error
from scripts.inference.engine import AnomalyInferenceEngine, PrefetchingDataLoader, RobustDataset, as_cases
from scripts.io.cases import DEFAULT_MAX_VOXELS, list_inputs, nifti_item
from scripts.io.files import BUNDLE_ROOT, bundle_configs, is_scan
from scripts.io.keys import ERROR, NAME, identity_of

logger = logging.getLogger(__name__)


class Predictor:
    """Scores cases with ``network`` (preprocessed batch -> anomaly probabilities on the working grid).

    Args:
        network: the fold ensemble (or any module of that contract), in eval mode on ``device``.
        inferer: how the network sees a whole scan (one pass, or sliding windows of the patch size).
        preprocessing: input item -> preprocessed, normalised case (``image`` on the working grid).
        postprocessing: preprocessed case with ``pred`` -> its outputs written (score, map on the input grid,
            worklist summary); a case with an ``error`` gets the outputs of a failed case.
        handlers: engine handlers of :meth:`predict_folder` (progress lines, the worklist).
        inputs: input folder -> items (:func:`scripts.io.cases.list_inputs`; radiographs: their own finder).
    """

    def __init__(self, network: torch.nn.Module, inferer: Callable, device: torch.device | str = "cpu",
                 amp: bool = False, preprocessing: Callable | None = None, postprocessing: Callable | None = None,
                 handlers: Sequence = (), inputs: Callable[[str], list[dict]] = list_inputs,
                 max_voxels: int = DEFAULT_MAX_VOXELS, num_workers: int = 0) -> None:
        self.network = network
        self.inferer = inferer
        self.device = torch.device(device)
        self.amp = bool(amp)
        self.preprocessing = preprocessing
        self.postprocessing = postprocessing
        self.handlers = list(handlers)
        self.inputs = inputs
        self.max_voxels = max_voxels
        self.num_workers = num_workers

    @classmethod
    def from_bundle(cls, dataset: str, models_dir: str | os.PathLike | None = None,
                    bundle_root: str | os.PathLike | None = None, **settings) -> Predictor:
        """The Predictor of the bundle's inference workflow (common.yaml, inference.yaml, the dataset overlay) for
        the models in ``models_dir`` (default the bundle's own), with ``settings`` as its keys (e.g. ``mode``,
        ``output_dir``, ``pixel_output_dir``, ``model_format``, ``worklist``)."""
        return cls.from_config(bundle_config(dataset, models_dir, bundle_root, **settings))

    @classmethod
    def from_config(cls, parser: ConfigParser) -> Predictor:
        """The config's ``predictor`` (what the inference workflow runs)."""
        return parser.get_parsed_content("predictor")

    @classmethod
    def for_maps(cls, parser: ConfigParser) -> Predictor:
        """The config's ensemble and inferer alone, without reading or writing files: for the maps of images
        preprocessed elsewhere (:meth:`predict_map`; calibration, export checks, benchmarks)."""
        get = parser.get_parsed_content
        return cls(get("network"), get("inferer"), get("device"), get("amp"))

    # ---- the steps of one case -------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type) if self.amp and self.device.type == "cuda" else contextlib.nullcontext()

    def predict_map(self, image: torch.Tensor) -> torch.Tensor:
        """The anomaly probabilities of a preprocessed, normalised batch (B, C, *spatial) on its working grid."""
        self.network.eval()
        with torch.no_grad(), self._autocast():
            return self.inferer(torch.as_tensor(image).to(self.device), self.network)

    def preprocess(self, item: Mapping | str | os.PathLike) -> dict:
        """The preprocessed case of an input item (:attr:`inputs`' items) or of a NIfTI file's path: never raises; a
        case that cannot be read gets its ``error`` (:class:`scripts.inference.engine.RobustDataset`). DICOM series
        and 2D images are items of :attr:`inputs` (their output names and reading folders are made there)."""
        if not isinstance(item, Mapping):
            path = str(item)
            if not is_scan(path):
                raise ValueError(f"{path!r}: a path given to the Predictor must be a NIfTI file (*.nii.gz, *.nii); "
                                 "pass DICOM series and 2D images as items of Predictor.inputs(folder)")
            item = nifti_item(path)
        return RobustDataset([item], self.preprocessing, self.max_voxels)[0]

    def infer(self, case: Mapping) -> dict:
        """``case`` with ``pred``, the map on its working grid, as the inference engine computes it; a case whose
        pass fails becomes a failed case (its ``error``), never an exception."""
        if case.get(ERROR):
            return dict(case)
        try:
            batch = list_data_collate([dict(case)])
            image = batch["image"].to(self.device)
            pred = self.predict_map(image)
            return decollate_batch({**batch, "image": image, "pred": pred}, detach=True)[0]
        except Exception as err:  # one case's failure never stops the others
            reason = describe_error(err)
            logger.error("%s: scoring failed: %s", case.get(NAME), reason)
            return {**identity_of(case), ERROR: reason}

    def postprocess(self, case: Mapping) -> dict:
        """The case's outputs written (:attr:`postprocessing`): the score, the map on the input grid, the worklist
        summary. A case that fails here gets the outputs of a failed case (the fallback score, no map)."""
        try:
            return self.postprocessing(dict(case))
        except Exception as err:
            logger.error("%s: writing its outputs failed: %s", case.get(NAME), describe_error(err))
            failed = {**identity_of(case), ERROR: case.get(ERROR) or describe_error(err)}
            if case.get(ERROR):  # the outputs of a failed case could not be written: nothing else to try
                return failed
            try:
                return self.postprocessing(dict(failed))
            except Exception as again:  # not even the fallback could be written
                reason = f"{failed[ERROR]}; no fallback written either: {describe_error(again)}"
                logger.error("%s: %s", case.get(NAME), reason)
                return {**failed, ERROR: reason}

    def predict_case(self, item: Mapping | str | os.PathLike) -> dict:
        """One case from input to outputs: ``pred`` (the map brought back to the input grid, pixel and both modes),
        ``score`` (sample and both modes), the worklist summary, and ``error`` ("" when it was scored)."""
        return self.postprocess(self.infer(self.preprocess(item)))

    # ---- a folder ----------------------------------------------------------------------------------------------

    def dataset(self, inputs: str | os.PathLike | Sequence[Mapping]) -> RobustDataset:
        """The cases of an input folder (or of a list of input items), each preprocessed when it is read: a case
        that cannot be read is an item with its ``error`` (:class:`scripts.inference.engine.RobustDataset`)."""
        items = self.inputs(inputs) if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        return RobustDataset(items, self.preprocessing, self.max_voxels)

    def engine(self, dataset: RobustDataset) -> AnomalyInferenceEngine:
        """The inference engine over ``dataset``: the next case is read in a background thread during this one, a
        case that fails is named and the others go on, and the handlers print the progress lines and write the
        worklist."""
        loader = PrefetchingDataLoader(dataset, batch_size=1, shuffle=False, num_workers=self.num_workers,
                                       collate_fn=as_cases)
        return AnomalyInferenceEngine(self, loader, self.handlers)

    def predict_folder(self, inputs: str | os.PathLike | Sequence[Mapping]) -> AnomalyInferenceEngine:
        """Every case of an input folder (or of a list of input items) through :meth:`engine`; returns the engine
        (its ``state``)."""
        engine = self.engine(self.dataset(inputs))
        engine.run()
        return engine


def bundle_config(dataset: str, models_dir: str | os.PathLike | None = None,
                  bundle_root: str | os.PathLike | None = None, **settings) -> ConfigParser:
    """The bundle's inference config for ``dataset`` (the one place that names its three files), with the models of
    ``models_dir`` and ``settings`` as its keys."""
    root = Path(bundle_root or BUNDLE_ROOT)
    parser = ConfigParser()
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.read_config(bundle_configs(root, "inference", dataset))
    parser.update({"bundle_root": str(root), **({"models_dir": str(models_dir)} if models_dir else {}), **settings})
    return parser
