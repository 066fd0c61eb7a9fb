"""DDP helpers for ``multi_gpu_train.yaml`` (one process per GPU with nccl, or several CPU processes with gloo):
the process group, and what only rank 0 runs. ``train.yaml``'s ``distributed`` (false; true in that overlay) says
whether a run joins a process group: :func:`start` and :func:`stop` do nothing otherwise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed


def init_process_group() -> None:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPUs), once; on a GPU, use this rank's."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def start(distributed: bool, device: torch.device) -> None:
    """A run's start: join the process group and use this rank's GPU, when ``distributed``."""
    if distributed:
        init_process_group()
        set_cuda_device(device)


def stop(distributed: bool) -> None:
    """A run's end: leave the process group, when ``distributed``."""
    if distributed:
        destroy_process_group()


def device_ids(device: torch.device) -> list[torch.device] | None:
    """DistributedDataParallel's ``device_ids``: this rank's GPU, none on CPUs."""
    return [device] if torch.cuda.is_available() else None


def set_cuda_device(device: torch.device) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(device)


def on_rank_zero(everything: Sequence, other_ranks: Sequence) -> list:
    """``everything`` on rank 0, ``other_ranks`` on the others (e.g. the handlers that log or write)."""
    return list(everything if torch.distributed.get_rank() == 0 else other_ranks)


def destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
