"""MONAI Deploy application: MOOD anomaly detection with the bundle's fold ensemble.

    python deploy/app.py -i IN -o OUT -m MODELS

IN is a folder of NIfTI scans (or one scan), MODELS the bundle's models folder (``bundle/models``: the dataset is
chosen by MOOD_DATASET, default brain) or one dataset's folder (``bundle/models/abdom``). OUT receives the MOOD
outputs of every scan from one pass of the ensemble: ``OUT/pixel/<name>`` (the anomaly map on the input grid, as
the bundle writes it) and ``OUT/sample/<name>.txt`` (abnormality score). The SDK's variables HOLOSCAN_INPUT_PATH,
HOLOSCAN_OUTPUT_PATH and HOLOSCAN_MODEL_PATH stand in for -i, -o and -m (as in a MAP container).
MOOD_MODEL_FORMAT picks the fold models: pytorch (state dicts, default), torchscript or onnx (the exports made by
`make export`); MOOD_ALLOW_PARTIAL_ENSEMBLE=1 scores with the folds there are when some of the models' plan are
missing.

Exit codes, as the bundle's inference: 0 when every scan was scored, 3 when some scan failed (each is named on
its progress line and every other scan was scored), another non-zero code when the app could not start.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application

from operators import (
    BundleInference,
    EnsembleInferenceOperator,
    MoodWriterOperator,
    ScanLoaderOperator,
    find_bundle_root,
    resolve_models,
)


class MoodAnomalyApp(Application):
    """Scores every scan of the input folder with the bundle's inference, one case at a time."""

    name = "mood_anomaly_app"
    writer: MoodWriterOperator | None = None  # set by compose(); counts the scored and the failed cases

    @property
    def any_case_failed(self) -> bool:
        """A case failed, or never reached the writer."""
        writer = self.writer
        return writer is None or bool(writer.failed) or writer.done + len(writer.failed) < writer.total
    description = "Self-supervised anomaly detection in brain MRI and abdominal CT (MICCAI MOOD)"
    version = "0.13.2"

    def compose(self) -> None:
        context: AppContext = Application.init_app_context(self.argv)
        input_path, output_dir = Path(context.input_path), Path(context.output_path)
        bundle_root = find_bundle_root(os.environ.get("MOOD_BUNDLE_ROOT"))  # first: it puts `scripts` on the path
        models_dir, dataset = resolve_models(context.model_path, os.environ.get("MOOD_DATASET"))
        input_dir = self._input_folder(input_path)
        bundle = BundleInference(bundle_root, dataset, models_dir, input_dir, output_dir,
                                 os.environ.get("MOOD_MODEL_FORMAT", "pytorch"),
                                 os.environ.get("MOOD_ALLOW_PARTIAL_ENSEMBLE", "0") == "1")
        total = len(bundle.cases)
        logging.info("%s: %d scans from %s, %s models from %s", self.name, total, input_path, dataset, models_dir)

        loader = ScanLoaderOperator(self, CountCondition(self, total), bundle=bundle, name="scan_loader")
        inference = EnsembleInferenceOperator(self, bundle=bundle, name="ensemble_inference")
        writer = MoodWriterOperator(self, bundle=bundle, total=total, name="mood_writer")
        self.writer = writer
        self.add_flow(loader, inference, {("case", "case")})
        self.add_flow(inference, writer, {("case", "case")})

    @staticmethod
    def _input_folder(input_path: Path) -> Path:
        """The bundle reads folders: a single scan given as the input is linked into a private folder."""
        if input_path.is_dir():
            return input_path
        folder = Path(tempfile.mkdtemp(prefix="mood_app_input_"))
        try:
            (folder / input_path.name).symlink_to(input_path.resolve())
        except OSError:
            shutil.copy(input_path, folder / input_path.name)
        return folder


def main() -> int:
    """Run the app; the exit code says whether any scan failed (``FAILED_CASES_EXIT_CODE``, as the bundle)."""
    app = MoodAnomalyApp()
    app.run()
    from scripts.inference.progress import FAILED_CASES_EXIT_CODE  # importable once compose found the bundle root

    return FAILED_CASES_EXIT_CODE if app.any_case_failed else 0


if __name__ == "__main__":
    sys.exit(main())
