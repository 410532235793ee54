"""Training dataset over several task packs (all-in-one restoration)."""
import math
import random

import cv2
import numpy as np
import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data as data

from perceive_ir_plugin.data.dataset_options import check_dataset_keys
from perceive_ir_plugin.data.folds import fold_of
from perceive_ir_plugin.data.task_pack import TaskPack
from perceive_ir_plugin.data.tasks import DEFAULT_SIGMAS, TASK_IDS, resolve_task_repeats


def to_tensor(img):
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 RGB in [0, 1] (NumPy arithmetic: no torch thread start-up)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0))


def upscale_to_min_side(imgs, size):
    """Bicubically upscale images (same size) so that their short side is at least ``size``.

    Returns:
        tuple[list[np.ndarray], bool]: The images and whether they were resized.
    """
    h, w = imgs[0].shape[:2]
    if min(h, w) >= size:
        return imgs, False
    s = size / min(h, w)
    new_w, new_h = max(size, int(math.ceil(w * s - 1e-9))), max(size, int(math.ceil(h * s - 1e-9)))
    return [cv2.resize(np.ascontiguousarray(im), (new_w, new_h), interpolation=cv2.INTER_CUBIC) for im in imgs], True


def random_box(h, w, size, use_hflip, use_vflip):
    """``[top, left, hflip, vflip]`` of a random ``size`` crop (the whole image when ``size`` is None)."""
    if size is None:
        top = left = 0
    else:
        top, left = random.randint(0, h - size), random.randint(0, w - size)
    hflip = int(use_hflip and random.random() < 0.5)
    vflip = int(use_vflip and random.random() < 0.5)
    return [top, left, hflip, vflip]


def apply_box(img, box, size):
    """Crop ``img`` (H, W, C) at ``box`` then flip (horizontal, vertical) as the box says."""
    top, left, hflip, vflip = box
    out = img if size is None else img[top:top + size, left:left + size]
    if hflip:
        out = out[:, ::-1]
    if vflip:
        out = out[::-1]
    return out


@DATASET_REGISTRY.register()
class AllInOneDataset(data.Dataset):
    """Paired training samples drawn from several task packs with per-task repeat factors.

    Reads ``<dataroot>/<split>/<task>/{lq,gt}.lmdb`` made by ``perceive-ir pack``. Each image of task t
    appears ``repeat[t]`` times per epoch. A sample is a random ``gt_size`` crop (images whose short side is
    smaller are first upscaled bicubically, SPEC §8.2, with a one-time warning per task), optionally flipped
    horizontally / vertically (p = 0.5 each). Denoising packs hold clean images: the sample carries the
    clean crop as ``lq`` with ``sigma`` > 0 and ``noise_seed``; the model adds the noise on its device with
    :func:`perceive_ir_plugin.data.degradations.apply_pending_noise`. The σ of an image's r-th repeat is
    ``sigmas[(image_index + r) % len(sigmas)]``, so a repeat of 12 gives each image 4 crops per σ.

    Args:
        opt (dict): Options:
            dataroot (str): Pack root.
            tasks (list[str] | dict[str, int] | None): Tasks, or task -> repeat factor. Default: the setting's.
            setting (str): ``'3task'`` (default) or ``'5task'`` (also ``'paper'``, ``'stage1'``) repeat table.
            split (str): Pack split to read, default ``'train'``.
            sigmas (list[float]): Training noise levels (0-255 scale), default (15, 25, 50).
            gt_size (int | None): Crop size; ``None`` returns whole images (batch size 1 only).
            use_hflip (bool): Random horizontal flips, default True.
            use_vflip (bool): Random vertical flips, default True.
            return_lq_pos (bool): Also return ``lq_pos``, an independent crop (own position and flips) of the
                same degraded image (same noise realisation for denoising), default False.
            folds (list[int] | None): Keep only samples whose :func:`fold_of` is listed.
            n_folds (int): Number of folds for ``folds``, default 2.
            io_backend (dict): ``{type: lmdb}`` (the only backend).

    Sample (``__getitem__``):
        lq, gt (Tensor): (3, P, P) float32 RGB in [0, 1]; ``lq`` is clean when ``sigma`` > 0.
        lq_pos (Tensor): (3, P, P), only with ``return_lq_pos``.
        task (Tensor): int64 task id (index in ``TASKS``); task_name (str).
        sigma (Tensor): float32, > 0 means noise of σ/255 is still to be added to ``lq`` / ``lq_pos``.
        noise_seed (Tensor): int64 seed of that noise.
        crop (Tensor): int64 (4,) ``[top, left, hflip, vflip]`` of ``lq``/``gt``; crop_pos likewise for lq_pos.
        key (str): ``'<task>/<lmdb key>'``; lq_path, gt_path (str): ``<pack>/<lq|gt>.lmdb/<key>``.
    """

    option_keys = ('dataroot', 'tasks', 'setting', 'split', 'sigmas', 'gt_size', 'use_hflip', 'use_vflip',
                   'return_lq_pos', 'folds', 'n_folds', 'io_backend')

    def __init__(self, opt):
        super().__init__()
        check_dataset_keys(opt, self.option_keys, type(self).__name__)
        self.opt = opt
        if not opt.get('dataroot'):
            raise ValueError("AllInOneDataset: option 'dataroot' (pack root made by `perceive-ir pack`) is required")
        backend = (opt.get('io_backend') or {'type': 'lmdb'}).get('type', 'lmdb')
        if backend != 'lmdb':
            raise ValueError(f"AllInOneDataset: io_backend type {backend!r} is not supported; it reads LMDB packs "
                             "(io_backend: {type: lmdb}). Pack folders with `perceive-ir pack --layout paired`.")
        self.split = opt.get('split', 'train')
        self.repeats = resolve_task_repeats(opt.get('tasks'), opt.get('setting', '3task'))
        self.sigmas = [float(s) for s in opt.get('sigmas', DEFAULT_SIGMAS)]
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ValueError(f"AllInOneDataset: option 'sigmas' must list positive noise levels, got {self.sigmas}")
        self.gt_size = opt.get('gt_size', 256)
        if self.gt_size is not None and (not isinstance(self.gt_size, int) or self.gt_size < 1):
            raise ValueError(f"AllInOneDataset: option 'gt_size' must be a positive integer or null, got {self.gt_size!r}")
        self.use_hflip = bool(opt.get('use_hflip', True))
        self.use_vflip = bool(opt.get('use_vflip', True))
        self.return_lq_pos = bool(opt.get('return_lq_pos', False))
        folds = opt.get('folds')
        n_folds = int(opt.get('n_folds', 2))
        if folds is not None:
            folds = {int(f) for f in folds}
            if not folds or min(folds) < 0 or max(folds) >= n_folds:
                raise ValueError(f"AllInOneDataset: option 'folds' must list fold ids in [0, {n_folds - 1}], got {sorted(folds)}")

        self.packs, self.keys = {}, {}
        for task in self.repeats:
            pack = TaskPack(opt['dataroot'], self.split, task)
            keys = pack.keys if folds is None else [k for k in pack.keys if fold_of(task, k, n_folds) in folds]
            if not keys:
                where = '' if folds is None else f' after the fold filter folds={sorted(folds)}'
                raise ValueError(f"AllInOneDataset: task '{task}' has no samples in {pack.dir}{where}")
            self.packs[task], self.keys[task] = pack, keys
        self.task_order = list(self.repeats)
        sizes = [len(self.keys[t]) * self.repeats[t] for t in self.task_order]
        self.offsets = np.cumsum([0] + sizes)
        self._warned_upscale = set()
        logger = get_root_logger()
        logger.info('AllInOneDataset: ' + ', '.join(
            f'{t} {len(self.keys[t])} x{self.repeats[t]}' for t in self.task_order) + f' = {len(self)} samples/epoch')

    def __len__(self):
        return int(self.offsets[-1])

    def locate(self, index):
        """``(task, key, repeat_index, image_index)`` of a dataset index."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f'AllInOneDataset index {index} out of range ({len(self)})')
        t = int(np.searchsorted(self.offsets, index, side='right') - 1)
        task = self.task_order[t]
        rep, i = divmod(int(index - self.offsets[t]), len(self.keys[task]))
        return task, self.keys[task][i], rep, i

    def sigma_of(self, task, image_index, rep):
        """Noise level (0-255) of a denoising sample, 0.0 for other tasks."""
        if task != 'denoise':
            return 0.0
        return self.sigmas[(image_index + rep) % len(self.sigmas)]

    def __getitem__(self, index):
        task, key, rep, i = self.locate(index)
        pack = self.packs[task]
        lq, gt = pack.read_pair(key)
        src = [gt] if lq is None else [lq, gt]
        size = self.gt_size
        if size is not None:
            src, resized = upscale_to_min_side(src, size)
            if resized and task not in self._warned_upscale:
                self._warned_upscale.add(task)
                get_root_logger().warning(f"AllInOneDataset: task '{task}' has images smaller than gt_size={size} "
                                          f'(first: {key!r}, {gt.shape[1]}x{gt.shape[0]}); they are upscaled bicubically')
        gt = src[-1]
        degraded = src[0]
        h, w = gt.shape[:2]
        box = random_box(h, w, size, self.use_hflip, self.use_vflip)
        sigma = self.sigma_of(task, i, rep)
        sample = {
            'lq': to_tensor(apply_box(degraded, box, size)),
            'gt': to_tensor(apply_box(gt, box, size)),
            'task': torch.tensor(TASK_IDS[task], dtype=torch.int64),
            'task_name': task,
            'sigma': torch.tensor(sigma, dtype=torch.float32),
            'noise_seed': torch.tensor(random.getrandbits(62) if sigma > 0 else 0, dtype=torch.int64),
            'crop': torch.tensor(box, dtype=torch.int64),
            'key': f'{task}/{key}',
            'lq_path': pack.lq_path(key),
            'gt_path': pack.gt_path(key),
        }
        if self.return_lq_pos:
            box_pos = random_box(h, w, size, self.use_hflip, self.use_vflip)
            sample['lq_pos'] = to_tensor(apply_box(degraded, box_pos, size))
            sample['crop_pos'] = torch.tensor(box_pos, dtype=torch.int64)
        return sample
