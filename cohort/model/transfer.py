"""A subject's arrays onto the network's device; on CUDA one subject ahead, overlapped.

:func:`host_tensor` wraps a (possibly read-only) numpy array as a tensor
without copying it: the loaders' hand-over arrays arrive as read-only views of
Ray's object store, which torch warns about (it has no read-only tensors);
nothing here writes to them. :class:`DeviceFeed` copies them onto the device:
on the CPU that is the array itself; on CUDA :meth:`DeviceFeed.start` stages
the next subject in pinned host memory on a worker thread and enqueues its
host-to-device copy on a side stream, while the current subject's forward pass
runs on the default stream; :meth:`DeviceFeed.take` makes the default stream
wait for that copy (an event, not a host synchronisation).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["DeviceFeed", "host_tensor"]


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as a CPU tensor sharing its memory (a contiguous copy only when it is
    not contiguous); never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


class DeviceFeed:
    """Arrays onto ``device``: at once (:meth:`now`), or started ahead (:meth:`start`,
    CUDA only: pinned memory, a side stream, a worker thread) and taken later."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ahead = device.type == "cuda"  # whether start() overlaps anything
        self._stream = torch.cuda.Stream(device) if self.ahead else None
        self._thread = (
            ThreadPoolExecutor(1, thread_name_prefix="cohort-h2d") if self.ahead else None
        )

    def now(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The arrays on the device now (on the CPU: the arrays themselves)."""
        return [host_tensor(a).to(self.device) for a in arrays]

    def start(self, arrays: Sequence[np.ndarray]) -> Future[list[torch.Tensor]]:
        """Begin copying ``arrays`` to the device (CUDA); :meth:`take` the result."""
        if self._thread is None:
            raise RuntimeError("DeviceFeed.start is for CUDA devices; use now()")
        return self._thread.submit(self._copy, list(arrays))

    def _copy(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        with torch.cuda.stream(self._stream):
            for array in arrays:
                source = host_tensor(array)
                pinned = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
                pinned.copy_(source)
                # the caching host allocator keeps `pinned` until this copy has run
                out.append(pinned.to(self.device, non_blocking=True))
        return out

    def take(self, pending: Future[list[torch.Tensor]]) -> list[torch.Tensor]:
        """The tensors of :meth:`start`, usable on the current stream."""
        tensors = pending.result()
        current = torch.cuda.current_stream(self.device)
        if self._stream is not None:
            current.wait_stream(self._stream)
        for tensor in tensors:
            tensor.record_stream(current)  # freed only after the current stream's use
        return tensors
