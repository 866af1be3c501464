"""Per-call time of calls queued back to back: the GPU's own time, without Python's launch gaps.

The GPU is held in a sleep kernel while Python queues the calls, then they run back to back between
two events (a training step's host runs ahead of the GPU the same way when it can). CUDA-graph
capture is not used: autograd's backward syncs with the legacy stream and breaks it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(dev: torch.device) -> None:
    """Wait for `dev` (a no-op on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def queued_call_ms(fn: Callable[[], object], dev: torch.device, iters: int,
                   eager_ms: float | None = None) -> tuple[float, float]:
    """(device ms per call, host ms to queue one call), medians of 5 rounds of `iters` calls.

    `eager_ms` bounds one call's host time and sizes the sleep (measured here when not given). On a
    CPU device both numbers are the host time.
    """
    fn()
    sync(dev)
    if eager_ms is None:
        start = time.perf_counter()
        fn()
        sync(dev)
        eager_ms = (time.perf_counter() - start) * 1e3
    device, host = [], []
    for _ in range(5):
        if dev.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # sleep longer than the queueing takes: 2e6 cycles per ms is an upper bound on the clock
            torch.cuda._sleep(int(2e6 * 1.5 * iters * eager_ms) + 2_000_000)
            begin.record()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        host.append((time.perf_counter() - start) * 1e3 / iters)
        if dev.type == "cuda":
            end.record()
            torch.cuda.synchronize(dev)
            device.append(begin.elapsed_time(end) / iters)
        else:
            device.append(host[-1])
    return statistics.median(device), statistics.median(host)
