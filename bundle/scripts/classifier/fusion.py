"""Fusion of the voxel classifier with fold networks in one models folder: the combination of the two maps and its
weight are chosen on the synthetic validation of training (each model fold's held-out tasks, scored by that fold's
classifier and by the network folds that held the same tasks out) and recorded in the plan's ``fusion``.

    make train DATA=DIR DATASET=brain FOREIGN=DIR     # the shipped recipe: the brain fuses with bundle/models

Each classifier fold scores its validation samples with every candidate (:data:`CANDIDATES`: weighted means of the
two maps with the classifier's weight 0 to 1, and their maximum), the networks' map being the mean of the network
folds that trained on none of its validation tasks; training records the candidate with the highest mean pixel AP
over the folds, unless it beats the classifier alone by less than :data:`MIN_GAIN` (networks cost inference time
for a gain within the noise of the validation). A weight of 1 keeps the classifier alone (the networks are not
copied), a weight of 0 the networks alone (the classifier's model files are removed); otherwise the networks' fold
files join the folder and the plan's ``network`` names them.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from scripts.io.files import load_json, save_json
from scripts.plans import PLAN_FILE, load_plan

__all__ = ["CANDIDATES", "MIN_GAIN", "FusedEnsemble", "check_fusable", "fuse", "networks_plan", "record_fusion",
           "shared_setting"]

logger = logging.getLogger(__name__)

# (method, the classifier's weight): weighted means from the networks alone (0) to the classifier alone (1), and
# the voxel-wise maximum
CANDIDATES = (("weighted_mean", 0.0), ("weighted_mean", 0.25), ("weighted_mean", 0.5), ("weighted_mean", 0.75),
              ("weighted_mean", 1.0), ("max", None))


# the relative gain in mean validation pixel AP over the classifier alone that a candidate keeping the networks must
# reach: below it the networks would cost a fused scan about 9 s (brain, 2 cores) for a tie (the equal-budget study,
# docs/experiments/2026-12-07-voxel-classifier.md: CPU networks' maximum 0.1693 against the classifier's 0.1693)
MIN_GAIN = 0.02


def candidate_name(method: str, weight: float | None) -> str:
    return "max" if method == "max" else f"weighted_mean_{weight:g}"


def fuse(classifier_map: torch.Tensor, network_map: torch.Tensor, method: str, weight: float | None) -> torch.Tensor:
    """The fused map of the two probability maps."""
    if method == "max":
        return torch.maximum(classifier_map, network_map)
    if method != "weighted_mean" or weight is None or not 0 <= weight <= 1:
        raise ValueError(f"fusion must be 'max' or 'weighted_mean' with a weight in [0, 1], got {method!r}, {weight}")
    return weight * classifier_map + (1 - weight) * network_map


class FusedEnsemble(torch.nn.Module):
    """The classifier's and the networks' fold ensembles behind the ensemble's contract, fused as the plan says."""

    def __init__(self, classifier: torch.nn.Module, networks: torch.nn.Module, method: str,
                 weight: float | None) -> None:
        super().__init__()
        fuse(torch.zeros(1), torch.zeros(1), method, weight)  # a bad record fails here, not on the first scan
        self.classifier, self.networks = classifier, networks
        self.method, self.weight = method, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fuse(self.classifier(x), self.networks(x), self.method, self.weight)


def networks_plan(models_dir: str | Path | None, dataset: str) -> dict | None:
    """The plan of the networks a classifier is to be fused with (``classifier_fuse_with``), None without any: the
    folder's own plan, or for a fused folder (the shipped brain models) the plan its networks were trained with,
    which the fusion record keeps, so that a fused folder lends its networks to a new fusion."""
    if not models_dir:
        return None
    plan = load_plan(models_dir, dataset)
    fusion = plan.get("fusion") or {}
    if fusion.get("networks_kept") and (fusion.get("networks") or {}).get("plan"):
        return dict(fusion["networks"]["plan"])
    return plan


def shared_setting(plan: Mapping | None, key: str, own):
    """A setting the classifier must share with the networks of ``plan`` (their ``spatial_size``,
    ``foreground_fraction``, ``normalisation`` mode or its ``fingerprint``), or the run's ``own`` without networks."""
    if plan is None:
        return own
    if key in ("normalisation", "fingerprint"):
        return plan["normalisation"]["mode" if key == "normalisation" else "fingerprint"]
    return plan[key]


# the plan keys a fused folder's two kinds must share: the same scans, on the same grid, normalised the same way
_SHARED = ("spatial_size", "foreground_fraction", "normalisation")


def check_fusable(plan: Mapping, networks_plan: Mapping, networks_dir: str | Path) -> None:
    """A clear error unless the networks of ``networks_plan`` can join the classifier of ``plan``: the same working
    grid, foreground and normalisation, 3D networks on the whole grid, with their split (to find, for each
    classifier fold, the network folds that held its validation tasks out too)."""
    where = f"the networks in {str(networks_dir)!r}"
    if networks_plan.get("network") is None or networks_plan.get("classifier") is not None:
        raise ValueError(f"{where}: their plan must describe networks alone")
    differ = [k for k in _SHARED if plan.get(k) != networks_plan.get(k)]
    if differ:
        raise ValueError(f"{where} were trained with other {differ} ({[networks_plan.get(k) for k in differ]}); the "
                         f"classifier has {[plan.get(k) for k in differ]}: train it with theirs")
    if networks_plan.get("slice_axis") is not None or networks_plan.get("patch_size") is not None:
        raise ValueError(f"{where}: fusion takes 3D networks on the whole working grid")
    if not (networks_plan.get("split") or {}).get("model_folds"):
        raise ValueError(f"{where}: their plan records no cross-validation split, so no fold can be matched to the "
                         "classifier's held-out tasks")


def record_fusion(ensemble_dir: str | Path, records: Sequence[Mapping], networks_dir: str | Path) -> dict:
    """Choose the candidate with the highest mean validation pixel AP over the folds' ``fusion_validation`` (the
    classifier alone unless the best beats it by :data:`MIN_GAIN`) and record it in the plan. The folder then holds
    what the winner needs: the networks' fold files are copied in unless the classifier alone wins; when the
    networks alone win, the classifier's model files are removed and the plan becomes the networks' own (their split
    and calibration), the folds' records keeping the classifier's validation."""
    ensemble_dir, networks_dir = Path(ensemble_dir), Path(networks_dir)
    names = [candidate_name(m, w) for m, w in CANDIDATES]
    means = {n: sum(r["fusion_validation"][n] for r in records) / len(records) for n in names}
    best = max(names, key=lambda n: (means[n], n == "weighted_mean_1"))
    if means[best] < means["weighted_mean_1"] * (1 + MIN_GAIN):  # a tie, or a gain within the noise
        best = "weighted_mean_1"
    method, weight = CANDIDATES[names.index(best)]
    path = ensemble_dir / PLAN_FILE
    plan = load_json(path)
    networks = networks_plan(networks_dir.parent, networks_dir.name)
    keep, alone = best != "weighted_mean_1", best == "weighted_mean_0"
    folds = [f"fold_{f['fold']}.pt" for f in networks["split"]["model_folds"]]
    if keep:  # the networks' whole fold ensemble joins the folder
        for name in folds:
            shutil.copyfile(networks_dir / name, ensemble_dir / name)
        plan["network"] = networks["network"]
    if alone:  # the classifier adds nothing: the folder is the networks' ensemble
        for name in (plan["classifier"] or {}).get("files") or {}:
            (ensemble_dir / name).unlink(missing_ok=True)
        plan = {**networks, "classifier": None}
    # the networks' own plan (less their operating points, which the fused folder's calibration replaces)
    lent = {k: v for k, v in networks.items() if k not in ("operating_points", "fusion")}
    plan["fusion"] = {"method": method, "classifier_weight": weight, "networks_kept": keep,
                      "classifier_kept": not alone,
                      "networks": {"folds": folds, "source": str(networks_dir),
                                   "plan": lent},
                      "min_gain": MIN_GAIN, "validation_pixel_ap": {n: round(v, 4) for n, v in means.items()}}
    plan.pop("operating_points", None)
    save_json(plan, path)
    logger.info("fusion chosen on the synthetic validation: %s (mean pixel AP %.3f; classifier alone %.3f, networks "
                "alone %.3f)%s", best, means[best], means["weighted_mean_1"], means["weighted_mean_0"],
                ": the networks are not kept" if not keep else ": the classifier is not kept" if alone else "")
    return plan["fusion"]
