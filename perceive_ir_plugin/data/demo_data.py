"""Small all-in-one packs made locally from scikit-image's bundled photographs.

**These are stand-ins, not the benchmarks.** No data set can be downloaded here, so the natural
photographs shipped inside scikit-image (no network access, ``skimage.data``) are degraded synthetically
per task (:mod:`perceive_ir_plugin.data.degradations`: Gaussian noise at load time, rain streaks,
atmospheric-scattering haze, line-kernel motion blur, gamma + noise low light) and packed in the same
layout as the real sets. They exercise the whole pipeline (packing, loading, training, evaluation); PSNR
numbers on them are not comparable with published results. Grey photographs are replicated to RGB.
"""
import zlib

import cv2
import numpy as np

from perceive_ir_plugin.data.degradations import synthesize
from perceive_ir_plugin.data.packing import write_task_pack
from perceive_ir_plugin.data.tasks import TASKS, check_task, task_id

# Train and test photographs are disjoint (the two views of skimage's stereo pair are both in train).
DEMO_TRAIN_IMAGES = ('astronaut', 'rocket', 'motorcycle_left', 'motorcycle_right', 'coins', 'moon', 'brick',
                     'grass', 'gravel')
DEMO_TEST_IMAGES = ('chelsea', 'coffee', 'camera')


def load_demo_image(name, max_side=None):
    """One bundled photograph as (H, W, 3) uint8 RGB (grey replicated), longest side <= ``max_side``."""
    from skimage import data as skdata
    if name in ('motorcycle_left', 'motorcycle_right'):
        left, right, _ = skdata.stereo_motorcycle()
        img = left if name == 'motorcycle_left' else right
    else:
        loader = getattr(skdata, name, None)
        if loader is None:
            raise ValueError(f'scikit-image has no bundled image {name!r}')
        img = loader()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f'skimage.data.{name} is {img.dtype}, not an 8-bit photograph')
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3])
    if max_side is not None and max(img.shape[:2]) > max_side:
        s = max_side / max(img.shape[:2])
        size = (max(1, int(round(img.shape[1] * s))), max(1, int(round(img.shape[0] * s))))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img


def _rng(seed, task, split, name):
    return np.random.default_rng([int(seed), task_id(task), zlib.crc32(f'{split}/{name}'.encode())])


def make_demo_packs(out_root, tasks=TASKS, splits=('train', 'test'), max_side=None, fmt='png', seed=0,
                    train_images=DEMO_TRAIN_IMAGES, test_images=DEMO_TEST_IMAGES, progress=False):
    """Build ``<out_root>/<split>/<task>`` packs from the bundled photographs (seconds on a CPU).

    Denoising packs hold clean images only (noise is added at load time, as for the real sets); the
    other tasks get an ``lq.lmdb`` degraded deterministically from ``seed``. Re-running resumes / skips.

    Args:
        out_root (str): Pack root (created).
        tasks (Sequence[str]): Tasks to build.
        splits (Sequence[str]): Any of ``'train'``, ``'test'``.
        max_side (int | None): Downscale so the longest side is at most this (e.g. 64 for unit tests).
        fmt (str): ``'png'`` or ``'raw'``.
        seed (int): Seed of the synthetic degradations.
        train_images (Sequence[str]): Photograph names of the train split.
        test_images (Sequence[str]): Photograph names of the test split.
        progress (bool): Show progress bars.

    Returns:
        dict[tuple[str, str], dict]: ``(split, task)`` -> pack description (see ``write_task_pack``).
    """
    names_of = {'train': tuple(train_images), 'test': tuple(test_images)}
    photos = {}
    out = {}
    for split in splits:
        if split not in names_of:
            raise ValueError(f"Unknown split {split!r}; use 'train' or 'test'")
        for name in names_of[split]:
            if name not in photos:
                photos[name] = load_demo_image(name, max_side)
        for task in tasks:
            check_task(task)
            items = []
            for name in names_of[split]:
                gt = photos[name]
                lq = None if task == 'denoise' else (
                    lambda gt=gt, task=task, name=name, split=split: synthesize(gt, task, _rng(seed, task, split, name)))
                items.append((name, lq, gt))
            source = {'kind': 'demo', 'note': 'scikit-image bundled photographs, synthetic degradations '
                      '(stand-ins for the real benchmarks)', 'images': list(names_of[split]),
                      'max_side': max_side, 'seed': seed}
            out[(split, task)] = write_task_pack(out_root, split, task, items, fmt=fmt, source=source,
                                                 progress=progress)
    return out
