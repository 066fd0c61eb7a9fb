"""Network helpers for the configs."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

from scripts.transforms import IntensityForeground

__all__ = ["EMPTY_SLICE_LOGIT", "SLIDING_WINDOW_OVERLAP", "SliceWiseNetwork", "make_inferer", "slices_with_foreground",
           "with_output_prior"]

# nnU-Net's sliding-window setting (Isensee et al. 2021): windows overlap by half, Gaussian-weighted so that the
# centre of a window, where the network saw the most context, counts most
SLIDING_WINDOW_OVERLAP = 0.5


# the logit of a slice without foreground: its sigmoid is exactly 0.0 in float32 (and float16), while the loss of a
# label 0 there stays finite (-inf would make binary cross-entropy's 0 * inf a NaN)
EMPTY_SLICE_LOGIT = -1.0e4


def slices_with_foreground(volume: torch.Tensor, slice_axis: int, fraction: float) -> torch.Tensor:
    """Which slices of ``volume`` (C, *spatial; the network's input, already normalised) along spatial axis
    ``slice_axis`` hold foreground by the preprocessing's rule (:class:`scripts.transforms.IntensityForeground`,
    voxels above ``min + fraction (p99 - min)``): a boolean vector, one entry per slice. Training draws its slices
    from these; inference gives the others 0. The rule is applied to the network's input itself, so training,
    validation, calibration and inference agree on it without carrying the mask along."""

    mask = IntensityForeground(fraction)(volume)[0]
    other = [a for a in range(mask.ndim) if a != slice_axis]
    return mask.any(dim=other) if other else mask


class SliceWiseNetwork(torch.nn.Module):
    """A 2D network applied slice by slice to 3D volumes: the FPI system (Tan et al., MOOD 2020), whose network
    sees one 2D slice at a time and whose per-slice maps are stacked back into the volume's map.

    Inputs (B, C, H, W) go to the 2D network unchanged (training on slices). Inputs (B, C, *3 spatial) are cut
    along spatial axis ``slice_axis``; the slices that hold foreground (:func:`slices_with_foreground`) run through
    the network ``slice_batch`` at a time, and the others get :data:`EMPTY_SLICE_LOGIT` (probability 0). The output
    has the input's shape and, for a MetaTensor input, its metadata (for ``Invertd`` downstream), so everything
    downstream of the network (validation metrics, the ensemble, the MOOD writers) is the same as for 3D models.
    """

    def __init__(self, network: torch.nn.Module, slice_axis: int, foreground_fraction: float = 0.1,
                 slice_batch: int = 16) -> None:
        super().__init__()
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be a spatial axis of a volume, 0, 1 or 2, got {slice_axis!r}")
        self.network = network
        self.slice_axis = int(slice_axis)
        self.foreground_fraction = float(foreground_fraction)
        self.slice_batch = max(1, int(slice_batch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.network(x)
        if x.ndim != 5:
            raise ValueError(f"a slice-wise network takes (B, C, H, W) slices or (B, C, *3 spatial) volumes, got "
                             f"shape {tuple(x.shape)}")
        plain = x.as_tensor() if isinstance(x, MetaTensor) else x
        axis = 2 + self.slice_axis
        outputs = []
        for volume in plain:
            keep = slices_with_foreground(volume, self.slice_axis, self.foreground_fraction)
            slices = volume.movedim(axis - 1, 0)  # (S, C, h, w)
            out = None
            chosen = torch.nonzero(keep).flatten()
            for start in range(0, len(chosen), self.slice_batch):
                index = chosen[start:start + self.slice_batch]
                predicted = self.network(slices[index])
                if isinstance(predicted, MetaTensor):
                    predicted = predicted.as_tensor()
                if out is None:
                    out = predicted.new_full((slices.shape[0], *predicted.shape[1:]), EMPTY_SLICE_LOGIT)
                out[index] = predicted
            if out is None:  # not one slice with foreground
                out = plain.new_full((slices.shape[0], 1, *slices.shape[2:]), EMPTY_SLICE_LOGIT)
            outputs.append(out.movedim(0, axis - 1))
        result = torch.stack(outputs)
        if isinstance(x, MetaTensor):
            result = MetaTensor(result)
            result.copy_meta_from(x)
        return result


def make_inferer(patch_size: Sequence[int] | None, sliding_window: bool = False,
                 overlap: float = SLIDING_WINDOW_OVERLAP) -> Inferer:
    """How a network sees a whole scan: in one pass (SimpleInferer), or, when it was trained on ``patch_size``
    crops of the working grid and ``sliding_window`` is set, in MONAI's SlidingWindowInferer over windows of that
    size (for grids whose one pass does not fit the memory). The network is convolutional, so it takes the whole
    grid either way; on synthetic validation one pass scored higher (docs: "Patches at the native resolution")."""
    if not patch_size or not sliding_window:
        return SimpleInferer()
    return SlidingWindowInferer(roi_size=[int(s) for s in patch_size], sw_batch_size=1, overlap=overlap,
                                mode="gaussian")


def inferer_for(plan: Mapping, sliding_window: bool | None = None) -> Inferer:
    """:func:`make_inferer` as the ``plan`` says, or in sliding windows as a run asks (``sliding_window`` True or
    False; None: the plan's)."""
    return make_inferer(plan["patch_size"], plan["sliding_window"] if sliding_window is None else sliding_window)


# numeric precisions of a training pass (train.yaml's ``precision``; ``auto``: :func:`resolved_precision`)
PRECISIONS = ("fp32", "bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), which make bfloat16 convolutions cheaper
    than float32 ones; without them autocast would emulate bfloat16 and be slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private helpers of torch.cpu: absent means unknown, so no
        return False


def resolved_precision(precision: str, device: torch.device | str, dims: int = 3) -> str:
    """A training run's precision: ``auto`` is ``bf16`` for a 3D network on a CPU with bfloat16 instructions (2.5x
    the samples per second of fp32 at 64^3 with channels-last, at an equal validation AP per epoch:
    docs/experiments, 2026-12-06), else ``fp32`` (2D networks: not measured; GPUs train in mixed precision through
    the trainer's ``amp``)."""
    if precision == "auto":
        return "bf16" if int(dims) == 3 and torch.device(device).type == "cpu" and cpu_has_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
    return precision


def resolved_channels_last(channels_last: bool | str, device: torch.device | str, dims: int = 3) -> bool:
    """A training run's memory layout: ``auto`` is channels-last 3D for a 3D network on a CPU (faster there in fp32
    and bf16 alike), else the default layout (2D networks: not measured)."""
    if channels_last == "auto":
        return int(dims) == 3 and torch.device(device).type == "cpu"
    return bool(channels_last)


class PrecisionInferer(Inferer):
    """``inferer`` (default one pass) in another precision or memory layout, for training on a CPU: ``bf16`` runs
    the pass under ``torch.autocast`` in bfloat16 (convolutions in bfloat16 where the CPU has the instructions,
    e.g. AVX512-BF16 or AMX; weights, optimiser and gradients stay float32) and returns float32, so the loss and
    the metrics stay in float32; ``channels_last`` hands volumes over in channels-last 3D order (the network's
    weights converted once by :func:`with_memory_format`). ``fp32`` without ``channels_last`` is ``inferer``
    itself. ``make bench-training`` measures each against fp32 in the same run."""

    def __init__(self, inferer: Inferer | None = None, precision: str = "fp32", channels_last: bool = False) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.inferer = inferer or SimpleInferer()
        self.precision = precision
        self.channels_last = bool(channels_last)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if self.channels_last and inputs.ndim in CHANNELS_LAST:
            inputs = inputs.contiguous(memory_format=CHANNELS_LAST[inputs.ndim])
        if self.precision == "fp32":
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16):
            return self.inferer(inputs, network, *args, **kwargs).float()


# channels-last order of a tensor of each rank: volumes (N, C, D, H, W) and images or slices (N, C, H, W)
CHANNELS_LAST = {5: torch.channels_last_3d, 4: torch.channels_last}


def with_memory_format(network: torch.nn.Module, channels_last: bool = False) -> torch.nn.Module:
    """``network`` with its convolution weights in channels-last order when ``channels_last``: 3D for a 3D network,
    2D for a 2D one (images, slice-wise models); its state dict is the same."""
    ranks = {p.ndim for p in network.parameters()} & set(CHANNELS_LAST)
    if not channels_last or not ranks:
        return network
    return network.to(memory_format=CHANNELS_LAST[max(ranks)])


def with_output_prior(network: torch.nn.Module, prior: float = 0.01) -> torch.nn.Module:
    """Start the network at a small anomaly probability: set the bias of its last convolution to the
    logit of ``prior`` (the RetinaNet prior initialisation).

    Anomalous voxels are rare, and a network that starts at sigmoid(0) = 0.5 everywhere spends its first
    thousands of Adam steps (about lr per step on that bias) only learning to say "normal" before it can
    learn where anomalies are. ``prior=None`` keeps the default initialisation.
    """
    if prior is None:
        return network
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    last = [m for m in network.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    if last.bias is None:
        raise ValueError(f"the network's last convolution {last} has no bias to initialise")
    with torch.no_grad():
        last.bias.fill_(math.log(prior / (1.0 - prior)))
    return network


def build_network(plan: Mapping, slice_batch: int = 16) -> torch.nn.Module | None:
    """A fresh network of the plan's definition (``monai.networks.nets.<name>(**args)``); for a plan with a
    ``slice_axis``, that 2D network inside :class:`scripts.networks.SliceWiseNetwork`, which takes volumes and runs
    ``slice_batch`` slices per pass (a speed and memory setting: the output is the same). None for a plan of voxel
    classifiers alone (no network)."""
    from monai.networks import nets

    spec = plan["network"] if "network" in plan else plan
    if spec is None:
        return None
    network_class = getattr(nets, spec["name"], None)
    if network_class is None:
        raise ValueError(f"the plan names network {spec['name']!r}, which monai.networks.nets does not have")
    network = network_class(**copy.deepcopy(spec["args"]))
    if "network" in plan and plan.get("slice_axis") is not None:
        network = SliceWiseNetwork(network, plan["slice_axis"], plan["foreground_fraction"], slice_batch)
    return network


def default_device(local_rank: int | str | None = None) -> torch.device:
    """The GPU when there is one (``cuda:<local_rank>`` under torchrun), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda" if local_rank is None else f"cuda:{int(local_rank)}")
