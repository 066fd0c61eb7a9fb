"""The synthetic-anomaly engine: pure torch, N-D (2D and 3D), CPU or GPU, randomness from an explicit
``torch.Generator``. No MONAI import: MONAI transforms wrap it in ``scripts.transforms``.

Input intensities: any scale. The engine normalises internally by the image's foreground standard deviation
(``intensity_scale``), so z-scored input reproduces the paper's constants exactly (labeller sigma 0.2,
intensity magnitudes 0.2) and CT in Hounsfield units or in [0, 1] gets the same anomalies and labels.
"""

from .labelling import fill_holes, flipped_gaussian, grey_close, label_region
from .poisson import dst1, poisson_blend
from .shapes import AnomalyShape, place_shape, rasterise, sample_shape
from .tasks import TASK_NEEDS, TASKS, default_foreground, intensity_scale, synthesize

__all__ = [
    "AnomalyShape",
    "TASKS",
    "TASK_NEEDS",
    "default_foreground",
    "dst1",
    "fill_holes",
    "flipped_gaussian",
    "grey_close",
    "intensity_scale",
    "label_region",
    "place_shape",
    "poisson_blend",
    "rasterise",
    "sample_shape",
    "synthesize",
]
