"""Timing helpers shared by the bench scripts (not a benchmark itself)."""
import statistics
import time

import torch


def sync(device):
    """Wait for queued CUDA work on ``device`` (no-op on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_call(fn, device, warmup, repeats):
    """Median wall time of ``fn()`` in milliseconds."""
    return time_interleaved([fn], device, warmup, repeats)[0]


def time_interleaved(fns, device, warmup, repeats):
    """Median wall times (ms) of several callables, run in turn in every round.

    Interleaving makes slow drifts of the machine (other processes, clocks) hit every
    candidate alike, so their ratio stays meaningful on a busy machine.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            sync(device)
            times[i].append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]
