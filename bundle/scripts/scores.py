"""How an anomaly map becomes one score per scan (the plan's ``sample_score`` record names the aggregation and its
parameters, :func:`scripts.plans.sample_score_method`): used alike by validation, calibration and inference."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from scripts.plans import FPI_POLYORDER, FPI_TOP_SLICES, FPI_WINDOW_FRACTION, SAMPLE_SCORE_AGGREGATIONS


def fpi_slice_score(prediction: torch.Tensor, slice_axis: int = 2, top_slices: float = FPI_TOP_SLICES,
                    window_fraction: float = FPI_WINDOW_FRACTION, polyorder: int = FPI_POLYORDER) -> torch.Tensor:
    """FPI's sample score of a map (*spatial, or 1, *spatial): per-slice means along spatial axis ``slice_axis``,
    smoothed by a Savitzky-Golay filter of about ``window_fraction`` of the slices (an odd window, at least
    ``polyorder + 2``; none when the map has fewer slices), then the mean of the highest ``top_slices`` fraction
    (at least one)."""
    from scipy.signal import savgol_filter

    spatial = prediction.reshape(prediction.shape[-3:]).float() if prediction.ndim >= 3 else prediction.float()
    means = spatial.movedim(slice_axis, 0).reshape(spatial.shape[slice_axis], -1).mean(dim=1)
    window = max(polyorder + 2, int(round(window_fraction * means.numel())))
    window += 1 - window % 2  # odd
    if window <= means.numel():
        smoothed = savgol_filter(means.cpu().double().numpy(), window, polyorder)
        means = torch.as_tensor(smoothed, dtype=torch.float32, device=prediction.device)
    k = max(1, int(round(top_slices * means.numel())))
    return means.topk(k).values.mean()


def sample_score(prediction: torch.Tensor, method: float | Mapping = 1e-2) -> torch.Tensor:
    """Scan-level score from an anomaly map (*spatial, or 1, *spatial): ``method`` is a plan's ``sample_score``
    record (:func:`sample_score_method`) or a number, the top fraction of ``mean_of_top_fraction``: the mean of
    that fraction of the map's highest voxels (at least one)."""
    if isinstance(method, Mapping):
        if method.get("aggregation") == "fpi_top_slices":
            return fpi_slice_score(prediction, method["slice_axis"], method["top_slices"], method["window_fraction"],
                                   method["polyorder"])
        if method.get("aggregation") != "mean_of_top_fraction":
            raise ValueError(f"unknown sample score aggregation {method.get('aggregation')!r}; this bundle knows "
                             f"{SAMPLE_SCORE_AGGREGATIONS}")
        method = method["top_fraction"]
    flat = prediction.reshape(-1).float()
    k = max(1, int(round(float(method) * flat.numel())))
    return flat.topk(k).values.mean()
