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


def resolve_run_args(parser, args):
    """Device and defaults shared by the bench scripts' ``--device/--threads/--scale/--repeats/--warmup``.

    Returns:
        tuple: ``(device, scale, repeats, warmup)``; on CUDA full-size networks, 20 timed and
        5 untimed runs, on the CPU small networks, 3 and 1.
    """
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda but CUDA is not available')
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == 'cuda'
    scale = args.scale or ('full' if on_gpu else 'small')
    repeats = args.repeats or (20 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    return device, scale, repeats, warmup
