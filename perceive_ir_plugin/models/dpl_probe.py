"""The epoch probe of the difficulty-adaptive perceptual loss (SPEC §4.2).

At each epoch start the current model restores a fixed set of training crops; the mean
PSNR is the reference against which every proxy's PSNR decides its α (hard 1.25 / easy 0.75).

Probe set, per task (deterministic, from the training packs):

* candidates are the pack's keys in hash order (SHA1 of ``"<task>|<key>"``);
* denoise: ``per_task`` crops of the first keys (cycled when there are fewer), an equal share
  per σ (24 = 8 × 15/25/50), noise from a generator seeded by the key and σ;
* other tasks: among the first ``candidates`` keys (96), the centre-crop input PSNR is
  computed and ``per_task`` keys (24) are taken at evenly spaced quantiles of it (all when
  fewer).

Crops are centred ``crop``×``crop`` (256); smaller images are first upscaled bicubically like
the training crops. A pack has no notion of "scene", so every key counts as one.
"""
import hashlib

import numpy as np
import torch

from perceive_ir_plugin.data.all_in_one_dataset import to_tensor, upscale_to_min_side
from perceive_ir_plugin.data.task_pack import TaskPack
from perceive_ir_plugin.models.proxies import psnr_per_sample


def _hash_order(task, keys):
    return sorted(keys, key=lambda k: hashlib.sha1(f'{task}|{k}'.encode()).hexdigest())


def _centre(img, size):
    img = upscale_to_min_side([img], size)[0][0]
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def _seed(*parts):
    return int(hashlib.sha1('|'.join(map(str, parts)).encode()).hexdigest()[:15], 16)


def build_probe_set(dataroot, tasks, split='train', per_task=24, candidates=96, crop=256, sigmas=(15, 25, 50)):
    """Build the probe crops.

    Args:
        dataroot (str): Pack root of the training data.
        tasks (Sequence[str]): Tasks to probe.
        split (str): Pack split. Default: ``'train'``.
        per_task (int): Crops per task. Default: 24.
        candidates (int): Hash-ordered keys considered for the quantile pick. Default: 96.
        crop (int): Crop size. Default: 256.
        sigmas (Sequence[float]): Denoising noise levels (0-255). Default: (15, 25, 50).

    Returns:
        dict: ``lq`` and ``gt`` (N, 3, crop, crop) float32 RGB [0, 1] (noisy ``lq`` for
        denoising), ``task`` (N,) names, ``key`` (N,) keys.
    """
    lqs, gts, names, keys = [], [], [], []
    for task in tasks:
        pack = TaskPack(dataroot, split, task)
        order = _hash_order(task, pack.keys)
        if task == 'denoise':
            for i in range(per_task):
                key = order[i % len(order)]
                sigma = float(sigmas[min(i * len(sigmas) // per_task, len(sigmas) - 1)])
                gt = to_tensor(_centre(pack.read_pair(key)[1], crop))
                gen = torch.Generator().manual_seed(_seed(task, key, sigma, i))
                noise = torch.randn(gt.shape, generator=gen) * (sigma / 255.0)
                lqs.append((gt + noise).clamp_(0, 1))
                gts.append(gt)
                names.append(task)
                keys.append(key)
            continue
        pool = []
        for key in order[:candidates]:
            lq, gt = pack.read_pair(key)
            pair = [to_tensor(_centre(lq, crop)), to_tensor(_centre(gt, crop))]
            pool.append((float(psnr_per_sample(pair[0][None], pair[1][None])[0]), key, pair))
        pool.sort(key=lambda item: (item[0], item[1]))
        picks = (range(len(pool)) if len(pool) <= per_task else
                 sorted(set(int(round(q)) for q in np.linspace(0, len(pool) - 1, per_task))))
        for j in picks:
            _, key, (lq, gt) = pool[j]
            lqs.append(lq)
            gts.append(gt)
            names.append(task)
            keys.append(key)
    return {'lq': torch.stack(lqs), 'gt': torch.stack(gts), 'task': names, 'key': keys}


def probe_psnr(forward, probe, batch_size=4, rank=0, world_size=1):
    """Mean PSNR of ``forward`` over the probe set (this rank's share, summed across ranks by the caller).

    Args:
        forward (callable): (B, 3, H, W) LQ on the model's device -> restored image.
        probe (dict): From :func:`build_probe_set` (CPU tensors).
        batch_size (int): Crops per forward.
        rank (int): This process' rank; it evaluates crops ``rank::world_size``.
        world_size (int): Number of ranks.

    Returns:
        tuple[float, int]: Sum of PSNRs and number of crops of this rank's share.
    """
    index = list(range(rank, probe['lq'].shape[0], world_size))
    total, count = 0.0, 0
    for start in range(0, len(index), batch_size):
        sel = index[start:start + batch_size]
        out = forward(probe['lq'][sel])
        total += float(psnr_per_sample(out, probe['gt'][sel].to(out.device)).sum())
        count += len(sel)
    return total, count
