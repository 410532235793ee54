"""Low / medium / high quality triplets for Perceive-IR's stage-1 prompt learning."""
import json
import os
import random

import cv2
import numpy as np
import torch
from torch.utils import data as data

from basicsr.utils.registry import DATASET_REGISTRY
from perceive_ir_plugin.data.dataset_options import check_dataset_keys
from perceive_ir_plugin.data.lmdb_io import LmdbImageReader, PackError
from perceive_ir_plugin.data.tasks import TASK_IDS, TASKS, check_task

MANIFEST = 'manifest.jsonl'
TIERS = ('low', 'medium', 'high')

# One reader per LMDB folder and process: py-lmdb refuses to open the same environment twice in a
# process, and the train and val triplet sets usually share packs (e.g. the GT pack).
_READERS = {}


def release_shared_readers(under=None):
    """Close the shared readers of packs inside folder ``under`` (all when None), e.g. before writing there."""
    under = None if under is None else os.path.abspath(under)
    for path in list(_READERS):
        if under is None or path == under or path.startswith(under + os.sep):
            _READERS.pop(path).close()


def shared_reader(path, task=None):
    """The process-wide :class:`LmdbImageReader` of ``path`` (created on first use)."""
    path = os.path.abspath(path)
    if path not in _READERS:
        _READERS[path] = LmdbImageReader(path, task=task)
    return _READERS[path]


def _five_crops(height, width, size):
    """Top-left corners of the four corner crops and the centre crop."""
    return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
            ((height - size) // 2, (width - size) // 2)]


@DATASET_REGISTRY.register()
class QualityTripletDataset(data.Dataset):
    """Stage-1 triplets written by ``perceive-ir render-medium``.

    Each item holds the three quality tiers of one scene, cropped identically:
    ``lq`` = low (the degraded input), ``medium`` = the cross-fitted restorer's output,
    ``gt`` = high (ground truth). The key names ``lq``/``gt`` keep BasicSR's conventions
    (``feed_data``, ``lq_path``); the quality prompt model reads all three.

    Pre-processing (SPEC §2.4): the three images are cropped to their common size, upscaled
    (bicubic, same factor) when the short side is below ``gt_size``, then in training a
    synchronised random ``gt_size`` crop and random flips (``use_hflip``, ``use_vflip``) are
    applied; otherwise the centre crop, or the five crops of the authors' audit
    (``five_crop: true``: four corners + centre, stacked).

    Task balance: with ``balance_tasks`` (default true in training) the dataset has
    ``n_tasks × samples_per_task`` items and item ``i`` belongs to task ``i mod n_tasks``
    (its ``(i div n_tasks) mod count``-th triplet). BasicSR's ``EnlargedSampler`` shuffles
    these indices, so every task fills the same share of each epoch (smaller tasks are
    repeated, i.e. sampled with replacement) and a batch holds about equal counts of each
    task; no custom sampler is needed, and DDP sharding still works. ``samples_per_task``
    defaults to the largest task's triplet count.

    Args:
        opt (dict): Options:
            ``dataroot`` (str): Folder with ``manifest.jsonl`` (``render-medium --out``).
            ``tasks`` (list[str], optional): Keep only these tasks.
            ``folds`` (list[int], optional): Keep only triplets of these folds.
            ``gt_size`` (int): Crop size (224).
            ``use_hflip`` (bool): Random synchronised horizontal flip (train; default true).
            ``use_vflip`` (bool): Random synchronised vertical flip (train; default false).
            ``balance_tasks`` (bool): Task-balanced indexing (default: true in training).
            ``samples_per_task`` (int, optional): Items per task per epoch when balanced.
            ``max_per_task`` (int, optional): Keep at most this many triplets per task
                (the first ones in key order; e.g. a quick validation subset).
            ``five_crop`` (bool): Non-training phases: stack the five audit crops.
            ``io_backend`` (dict): ``{type: lmdb}`` (the only backend of the triplet packs).
            ``phase`` (str): Set by BasicSR (``train``/``val``/``test``).

    Returns per item:
        ``lq``, ``medium``, ``gt``: float32 (3, S, S) — or (5, 3, S, S) with ``five_crop`` —
        RGB in [0, 1]; ``task`` (int64 tensor id), ``task_name`` (str), ``key`` (str,
        ``"<task>/<lmdb key>"``), ``fold`` (int64 tensor), ``lq_path`` / ``gt_path`` (str).
    """

    option_keys = ('dataroot', 'tasks', 'folds', 'gt_size', 'use_hflip', 'use_vflip', 'balance_tasks',
                   'samples_per_task', 'max_per_task', 'five_crop', 'io_backend')

    def __init__(self, opt):
        super().__init__()
        check_dataset_keys(opt, self.option_keys, type(self).__name__)
        self.opt = opt
        backend = (opt.get('io_backend') or {'type': 'lmdb'}).get('type', 'lmdb')
        if backend != 'lmdb':
            raise ValueError(f"QualityTripletDataset reads LMDB triplet packs only; io_backend.type is '{backend}'.")
        self.root = opt.get('dataroot')
        if not self.root:
            raise ValueError("QualityTripletDataset: option 'dataroot' (the render-medium output folder) is required.")
        manifest = os.path.join(self.root, MANIFEST)
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"No {MANIFEST} in '{self.root}' (option dataroot); create the triplets with "
                                    '`perceive-ir render-medium ... --out <dataroot>`.')
        self.is_train = opt.get('phase', 'train') == 'train'
        self.gt_size = int(opt.get('gt_size', 224))
        self.use_hflip = bool(opt.get('use_hflip', True))
        self.use_vflip = bool(opt.get('use_vflip', False))
        self.five_crop = bool(opt.get('five_crop', False)) and not self.is_train
        keep_tasks = opt.get('tasks')
        keep_tasks = None if keep_tasks is None else {check_task(t, option_key='tasks') for t in keep_tasks}
        keep_folds = opt.get('folds')
        keep_folds = None if keep_folds is None else {int(f) for f in keep_folds}
        max_per_task = opt.get('max_per_task')

        self._readers = {}
        by_task = {}
        with open(manifest, 'r', encoding='utf-8') as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    task = entry['task']
                    paths = {tier: self._resolve(entry[tier]) for tier in TIERS}
                    key, fold = str(entry['key']), int(entry['fold'])
                except (ValueError, KeyError, TypeError) as err:
                    raise PackError(f'{manifest}:{line_no}: malformed triplet entry ({err}); re-run render-medium.')
                if task not in TASK_IDS:
                    raise PackError(f"{manifest}:{line_no}: unknown task '{task}'.")
                if (keep_tasks is not None and task not in keep_tasks) or (keep_folds is not None
                                                                           and fold not in keep_folds):
                    continue
                for tier, path in paths.items():
                    reader = self._reader(path, task)
                    if key not in reader:
                        raise PackError(f"{manifest}:{line_no}: key {key!r} of task '{task}' is not in the {tier} "
                                        f'pack {path}; re-run render-medium to complete it.')
                by_task.setdefault(task, []).append({'task': task, 'key': key, 'fold': fold, **paths})
        if keep_tasks is not None:
            missing = sorted(keep_tasks - set(by_task))
            if missing:
                raise ValueError(f'QualityTripletDataset: no triplets of task(s) {missing} in {manifest} '
                                 f'(option tasks; folds {sorted(keep_folds) if keep_folds else "all"}).')
        if not by_task:
            raise ValueError(f'QualityTripletDataset: no triplets left in {manifest} after the tasks/folds filters.')
        self.tasks = [t for t in TASKS if t in by_task]
        for task in self.tasks:
            by_task[task].sort(key=lambda e: e['key'])
            if max_per_task:
                by_task[task] = by_task[task][:int(max_per_task)]
        self.by_task = by_task
        self.entries = [e for t in self.tasks for e in by_task[t]]
        self.balance = bool(opt.get('balance_tasks', self.is_train))
        self.samples_per_task = int(opt.get('samples_per_task') or max(len(v) for v in by_task.values()))

    def _resolve(self, path):
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.root, path))

    def _reader(self, path, task):
        if path not in self._readers:
            self._readers[path] = shared_reader(path, task)
        return self._readers[path]

    def __len__(self):
        return len(self.tasks) * self.samples_per_task if self.balance else len(self.entries)

    def _entry(self, index):
        if not self.balance:
            return self.entries[index]
        items = self.by_task[self.tasks[index % len(self.tasks)]]
        return items[(index // len(self.tasks)) % len(items)]

    def _prepare(self, images):
        """Common size, upscaling and cropping of the three (H, W, 3) uint8 images → list of crop stacks."""
        height = min(img.shape[0] for img in images)
        width = min(img.shape[1] for img in images)
        images = [img[:height, :width] for img in images]
        size = self.gt_size
        if min(height, width) < size:
            scale = size / min(height, width)
            new_h, new_w = max(size, int(round(height * scale))), max(size, int(round(width * scale)))
            images = [cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC) for img in images]
            height, width = new_h, new_w
        if self.is_train:
            corners = [(random.randint(0, height - size), random.randint(0, width - size))]
        elif self.five_crop:
            corners = _five_crops(height, width, size)
        else:
            corners = [((height - size) // 2, (width - size) // 2)]
        hflip = self.is_train and self.use_hflip and random.random() < 0.5
        vflip = self.is_train and self.use_vflip and random.random() < 0.5
        out = []
        for img in images:
            crops = []
            for top, left in corners:
                crop = img[top:top + size, left:left + size]
                if hflip:
                    crop = crop[:, ::-1]
                if vflip:
                    crop = crop[::-1]
                crops.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div(255.0))
            out.append(torch.stack(crops) if self.five_crop else crops[0])
        return out

    def __getitem__(self, index):
        entry = self._entry(index)
        task, key = entry['task'], entry['key']
        images = [self._reader(entry[tier], task).read(key) for tier in TIERS]
        low, medium, high = self._prepare(images)
        return {
            'lq': low,
            'medium': medium,
            'gt': high,
            'task': torch.tensor(TASK_IDS[task], dtype=torch.int64),
            'task_name': task,
            'key': f'{task}/{key}',
            'fold': torch.tensor(entry['fold'], dtype=torch.int64),
            'lq_path': f"{entry['low']}/{key}",
            'gt_path': f"{entry['high']}/{key}",
        }
