"""Inference cost of the Perceive-IR wrapper: wrapped vs bare backbone, and tiled 4K peak memory.

Prints markdown tables (never asserts anything about speed):

1. latency of the bare backbone and of the same backbone inside the Perceive-IR wrapper
   (frozen DINOv2 SGM + CFE + per-level FiLM) at 256x256 and 720x480 (batch 1, eval, no grad),
   and their ratio;
2. peak memory of tiled inference on a 3840x2160 image (tiles of --tile px, --overlap), through
   the same padded/tiled path the models' test() uses: CUDA ``max_memory_allocated`` on GPU; on
   CPU the process's peak resident set size (Linux VmHWM, reset before each measurement), or n/a.

Weights are random (timing only). Defaults: realistic official configurations on CUDA
(Restormer dim 48 [4,6,6,8], DINOv2 ViT-B/14), small ones on CPU.

Examples::

    python bench/inference.py --device cpu
    python bench/inference.py --device cuda                      # official sizes
    python bench/inference.py --device cuda --backbone NAFNet --bf16
"""
import argparse
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import BACKBONES, resolve_run_args, sync, time_interleaved  # noqa: E402  (bench/ is on sys.path)
import perceive_ir_plugin  # noqa: E402,F401  (registers the archs)
from basicsr.archs import build_network  # noqa: E402

from perceive_ir_plugin.utils.tiling import tiled_forward  # noqa: E402


def wrapper_options(backbone_opt, scale):
    """Options of the Perceive-IR wrapper around ``backbone_opt`` (random frozen DINOv2)."""
    from perceive_ir_plugin.demo.stage2 import wrapper_network_options
    return wrapper_network_options(backbone_opt, scale)


def _read_hwm_kib():
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm():
    try:
        with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
            f.write('5')  # resets the peak RSS (VmHWM) of this process, Linux >= 4.0
        return True
    except OSError:
        return False


def peak_memory(fn, device):
    """Run ``fn()`` once and return ``(peak MiB, how it was measured)``."""
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, 'CUDA max_memory_allocated (above baseline)'
    if not _reset_hwm() or _read_hwm_kib() is None:
        fn()
        return None, 'n/a (no /proc peak RSS on this OS)'
    before = _read_hwm_kib()
    fn()
    after = _read_hwm_kib()
    return max(0, after - before) / 1024, 'peak RSS growth (VmHWM, reset before the run)'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', help='cpu | cuda | cuda:N')
    parser.add_argument('--backbone', default='Restormer', choices=sorted(BACKBONES['full']))
    parser.add_argument('--scale', default=None, choices=('full', 'small'),
                        help='network sizes (default: full on CUDA, small on CPU)')
    parser.add_argument('--sizes', default='256x256,720x480', help='comma-separated WxH inputs')
    parser.add_argument('--repeats', type=int, default=None, help='timed runs per size (default 20 GPU / 3 CPU)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed runs first (default 5 GPU / 1 CPU)')
    parser.add_argument('--tile', type=int, default=512)
    parser.add_argument('--overlap', type=int, default=32)
    parser.add_argument('--big', default='3840x2160', help='WxH of the tiled memory test ("none" to skip)')
    parser.add_argument('--bf16', action='store_true', help='bf16 autocast (CUDA)')
    parser.add_argument('--channels-last', action='store_true', help='channels_last memory format (CUDA)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    args = parser.parse_args(argv)

    device, scale, repeats, warmup = resolve_run_args(parser, args)
    torch.manual_seed(0)
    backbone_opt = dict(BACKBONES[scale][args.backbone])
    bare = build_network(dict(backbone_opt)).to(device).eval()
    wrapped = build_network(wrapper_options(backbone_opt, scale)).to(device).eval()
    if args.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
        wrapped = wrapped.to(memory_format=torch.channels_last)
    multiple = int(getattr(bare, 'size_multiple', 1) or 1)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def forward(net, x):
        with torch.no_grad(), autocast:
            return tiled_forward(net, x, tile=None, multiple=multiple, pad_mode='reflect')

    n_bare = sum(p.numel() for p in bare.parameters())
    n_wrapped = sum(p.numel() for p in wrapped.parameters())
    n_sgm = sum(p.numel() for p in wrapped.semantic_encoder.parameters())
    print(f'# bench/inference.py — {datetime.date.today().isoformat()}\n')
    print(f'- device: {_device_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}')
    print(f'- backbone: {args.backbone} ({scale}: '
          f'{", ".join(f"{k}={v}" for k, v in backbone_opt.items() if k != "type")}); '
          f'{n_bare / 1e6:.2f} M params bare, wrapped {n_wrapped / 1e6:.2f} M trainable '
          f'+ {n_sgm / 1e6:.2f} M frozen DINOv2 ({wrapper_options(backbone_opt, scale)["sgm_config"]})')
    print(f'- batch 1, eval, no grad, bf16 autocast: {args.bf16}, channels_last: {args.channels_last}, '
          f'median of {repeats} after {warmup} warm-up; random weights\n')
    print('| input (WxH) | bare backbone (ms) | Perceive-IR wrapped (ms) | ratio |')
    print('|---|---:|---:|---:|')
    for size in args.sizes.split(','):
        w, h = (int(v) for v in size.lower().split('x'))
        x = torch.rand(1, 3, h, w, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t_bare, t_wrap = time_interleaved([lambda: forward(bare, x), lambda: forward(wrapped, x)], device, warmup,
                                          repeats)
        print(f'| {w}x{h} | {t_bare:.1f} | {t_wrap:.1f} | {t_wrap / t_bare:.3f}x |')

    if args.big.lower() != 'none':
        w, h = (int(v) for v in args.big.lower().split('x'))
        print(f'\nTiled inference on {w}x{h} (tile {args.tile}, overlap {args.overlap}, batch 1):\n')
        print('| network | peak memory (MiB) | time (s) | measured as |')
        print('|---|---:|---:|---|')
        x = torch.rand(1, 3, h, w, device=device)
        for label, net in (('bare backbone', bare), ('Perceive-IR wrapped', wrapped)):
            def run(net=net):
                with torch.no_grad(), autocast:
                    return tiled_forward(net, x, tile=args.tile, overlap=args.overlap, multiple=multiple,
                                         pad_mode='reflect')
            start = time.perf_counter()
            mib, how = peak_memory(run, device)
            seconds = time.perf_counter() - start
            print(f"| {label} | {'n/a' if mib is None else f'{mib:.0f}'} | {seconds:.1f} | {how} |")
    return 0


def _device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)'


if __name__ == '__main__':
    sys.exit(main())
