"""What the bench scripts share (not a benchmark itself): network sizes, timing, run arguments."""
import statistics
import time

import torch

# Backbones the scripts compare: full = the official sizes (GPU default), small = CPU default.
BACKBONES = {
    'full': {
        'Restormer': dict(type='Restormer', dim=48, num_blocks=[4, 6, 6, 8], num_refinement_blocks=4,
                          heads=[1, 2, 4, 8], ffn_expansion_factor=2.66, bias=False, LayerNorm_type='WithBias'),
        'NAFNet': dict(type='NAFNet', width=32, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 28],
                       dec_blk_nums=[1, 1, 1, 1]),
        'PromptIR': dict(type='PromptIR', dim=48, num_blocks=[4, 6, 6, 8], num_refinement_blocks=4, decoder=True),
    },
    'small': {
        'Restormer': dict(type='Restormer', dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                          heads=[1, 1, 2, 2], ffn_expansion_factor=2.66, bias=False, LayerNorm_type='WithBias'),
        'NAFNet': dict(type='NAFNet', width=16, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 1],
                       dec_blk_nums=[1, 1, 1, 1]),
        'PromptIR': dict(type='PromptIR', dim=48, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, decoder=True),
    },
}


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
