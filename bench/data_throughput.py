"""Training-sample throughput of the data loaders: LMDB-PNG, LMDB-raw and a PIL folder loader.

Builds the demo data (scikit-image photographs, full resolution) in a temporary folder, packs it as PNG
and raw LMDB, writes the same pairs as PNG files, then times 256-pixel training samples (random crop +
h/v flips, all five tasks, batch 8) with 0 and N DataLoader workers. The PIL loader does what the
official Perceive-IR code does per sample (``Image.open(...).convert('RGB')``, NumPy crop/flip, CPU noise
for denoising); the LMDB datasets leave denoising noise to the model's device (not timed here).

Usage: ``python bench/data_throughput.py [--samples 400] [--workers N] [--gt-size 256]``. Prints a markdown
table (samples/s); numbers depend on the machine, see the header line.

``--cuda-check`` (needs a GPU) instead runs the training loader with BasicSR's ``prefetch_mode: cuda``
(``CUDAPrefetcher``, pinned memory), adds the pending noise on the GPU with ``apply_pending_noise``,
compares it with the CPU result and prints a table of its cost per batch.
"""
import argparse
import os
import platform
import random
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import perceive_ir_plugin  # noqa: F401  (registers the datasets)
from basicsr.data import build_dataset
from perceive_ir_plugin.data.all_in_one_dataset import apply_box, random_box, to_tensor, upscale_to_min_side
from perceive_ir_plugin.data.demo_data import make_demo_packs
from perceive_ir_plugin.data.lmdb_io import LmdbImageReader
from perceive_ir_plugin.data.tasks import TASK_IDS, TASKS


class PilFolderDataset(torch.utils.data.Dataset):
    """Paired PNG folders read with PIL per sample, like the official (non-BasicSR) training code."""

    def __init__(self, root, gt_size):
        self.items, self.gt_size = [], gt_size
        for task in TASKS:
            for name in sorted(os.listdir(os.path.join(root, task, 'gt'))):
                lq = os.path.join(root, task, 'lq', name)
                self.items.append((task, lq if os.path.exists(lq) else None, os.path.join(root, task, 'gt', name)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        task, lq_path, gt_path = self.items[index]
        gt = np.array(Image.open(gt_path).convert('RGB'))
        lq = gt if lq_path is None else np.array(Image.open(lq_path).convert('RGB'))
        lq, gt = upscale_to_min_side([lq, gt], self.gt_size)[0]
        box = random_box(gt.shape[0], gt.shape[1], self.gt_size, True, True)
        lq, gt = to_tensor(apply_box(lq, box, self.gt_size)), to_tensor(apply_box(gt, box, self.gt_size))
        if lq_path is None:
            sigma = random.choice((15, 25, 50))
            lq = (lq + torch.randn_like(lq) * sigma / 255.0).clamp_(0, 1)
        return {'lq': lq, 'gt': gt, 'task': torch.tensor(TASK_IDS[task])}


def export_folders(pack_root, out_root):
    """Write the train packs as PNG folders ``<task>/{lq,gt}/<key>.png``."""
    for task in TASKS:
        for side in ('gt', 'lq'):
            path = os.path.join(pack_root, 'train', task, f'{side}.lmdb')
            if not os.path.isdir(path):
                continue
            reader = LmdbImageReader(path, task)
            os.makedirs(os.path.join(out_root, task, side), exist_ok=True)
            for key in reader.keys:
                Image.fromarray(reader.read(key)).save(os.path.join(out_root, task, side, f'{key}.png'),
                                                       compress_level=1)


def measure(dataset, workers, samples, batch):
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=samples + 2 * batch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                         drop_last=True)
    it = iter(loader)
    next(it)  # start-up (worker spawn, LMDB open) excluded
    n, start = 0, time.perf_counter()
    for b in it:
        n += b['lq'].shape[0]
        if n >= samples:
            break
    return n / (time.perf_counter() - start)


def cuda_check(args):
    """prefetch_mode cuda + apply_pending_noise on the GPU, compared with the CPU."""
    from basicsr.data import build_dataloader
    from basicsr.data.prefetch_dataloader import CUDAPrefetcher
    from perceive_ir_plugin.data.degradations import apply_pending_noise
    if not torch.cuda.is_available():
        raise SystemExit('--cuda-check needs a CUDA device')
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_packs(tmp, splits=('train',), fmt='raw')
        opt = dict(name='cuda', type='AllInOneDataset', phase='train', dataroot=tmp, setting='5task',
                   tasks={'denoise': 6, 'derain': 1, 'dehaze': 1, 'deblur': 1, 'lowlight': 1}, gt_size=args.gt_size,
                   return_lq_pos=True, batch_size_per_gpu=args.batch, num_worker_per_gpu=2, pin_memory=True,
                   prefetch_mode='cuda')
        loader = build_dataloader(build_dataset(opt), opt, num_gpu=1, dist=False, seed=0)
        prefetcher = CUDAPrefetcher(loader, {'num_gpu': 1})
        batch = prefetcher.next()
        assert all(v.is_cuda for v in batch.values() if torch.is_tensor(v)), 'a tensor stayed on the CPU'
        on_cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in batch.items()}
        clean = batch['lq'].clone()
        apply_pending_noise(batch)
        apply_pending_noise(on_cpu)
        diff = max((batch[k].cpu() - on_cpu[k]).abs().max().item() for k in ('lq', 'lq_pos'))
        active = batch['sigma'] > 0
        ratio = ((batch['lq'] - clean)[active] * 255).flatten(1).std(1) / batch['sigma'][active]
        timings = []
        for b in (8, 32):
            x = {'lq': torch.rand(b, 3, args.gt_size, args.gt_size, device='cuda'),
                 'lq_pos': torch.rand(b, 3, args.gt_size, args.gt_size, device='cuda'),
                 'sigma': torch.full((b,), 25.0, device='cuda'), 'noise_seed': torch.arange(b, device='cuda'),
                 'crop': torch.zeros(b, 4, dtype=torch.int64, device='cuda'),
                 'crop_pos': torch.zeros(b, 4, dtype=torch.int64, device='cuda')}
            for _ in range(3):
                apply_pending_noise(dict(x))
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                apply_pending_noise(dict(x))
            torch.cuda.synchronize()
            timings.append((b, (time.perf_counter() - start) / 20 * 1000))
    print(f'CUDA check on {torch.cuda.get_device_name()}: prefetch_mode cuda OK; '
          f'max |GPU - CPU| noisy pixel = {diff:.2e}; noise std / sigma per denoising sample = '
          f'{[round(r, 3) for r in ratio.tolist()]} (below 1 where clean pixels saturate)\n')
    print(f'| apply_pending_noise, {args.gt_size}x{args.gt_size}, lq + lq_pos | batch | ms |\n|---|---:|---:|')
    for b, ms in timings:
        print(f'| GPU | {b} | {ms:.3f} |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--samples', type=int, default=400)
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--gt-size', type=int, default=256)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--cuda-check', action='store_true', help='check prefetch_mode cuda + GPU noise instead')
    args = parser.parse_args()
    if args.cuda_check:
        return cuda_check(args)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        png_root, raw_root, folder_root = (os.path.join(tmp, n) for n in ('png', 'raw', 'folders'))
        make_demo_packs(png_root, splits=('train',), fmt='png')
        make_demo_packs(raw_root, splits=('train',), fmt='raw')
        export_folders(png_root, folder_root)
        common = dict(type='AllInOneDataset', phase='train', setting='5task', gt_size=args.gt_size,
                      tasks={t: 1 for t in TASKS})
        loaders = [('LMDB-PNG', build_dataset(dict(common, name='png', dataroot=png_root))),
                   ('LMDB-raw', build_dataset(dict(common, name='raw', dataroot=raw_root))),
                   ('PIL folders (official-style)', PilFolderDataset(folder_root, args.gt_size))]
        rows = []
        for name, ds in loaders:
            for workers in sorted({0, args.workers}):
                rows.append((name, workers, measure(ds, workers, args.samples, args.batch)))
    print(f'Data throughput, {args.gt_size}x{args.gt_size} crops, batch {args.batch}, {args.samples} samples, '
          f'demo photographs (9 train images, 300-741 px), {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} CPUs, torch {torch.__version__}\n')
    print('| loader | workers | samples/s |\n|---|---:|---:|')
    for name, workers, rate in rows:
        print(f'| {name} | {workers} | {rate:.0f} |')


if __name__ == '__main__':
    main()
