"""Evaluation dataset for one task (and one σ for denoising) with the protocols' deterministic noise."""
import numpy as np
import torch
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data as data

from perceive_ir_plugin.data.all_in_one_dataset import to_tensor
from perceive_ir_plugin.data.dataset_options import check_dataset_keys
from perceive_ir_plugin.data.degradations import protocol_noise_numpy, protocol_noise_torch
from perceive_ir_plugin.data.task_pack import TaskPack
from perceive_ir_plugin.data.tasks import DEFAULT_SIGMAS, TASK_IDS, check_task

PROTOCOLS = {
    # SPEC §8.4: 3-task = x16 centre crop, BSD68 noise from one RandomState(0) over sigma 15 -> 25 -> 50;
    # 5-task = no crop, noise from torch.Generator seeded 3407 + image index.
    '3task': {'crop_multiple': 16},
    '5task': {'crop_multiple': None},
}
FIVE_TASK_SEED = 3407

_STREAM_CACHE = {}


def crop_to_multiple(img, base):
    """Centre-crop (H, W, C) so H and W are multiples of ``base`` (PromptIR's ``crop_img`` split)."""
    if not base or base <= 1:
        return img
    h, w = img.shape[:2]
    ch, cw = h % base, w % base
    return img[ch // 2:h - ch + ch // 2, cw // 2:w - cw + cw // 2]


def center_crop(img, size):
    """Centre crop of at most ``size`` x ``size``."""
    h, w = img.shape[:2]
    th, tw = min(size, h), min(size, w)
    top, left = (h - th) // 2, (w - tw) // 2
    return img[top:top + th, left:left + tw]


def _numpy_stream_states(shapes, sigmas, cache_key):
    """RandomState(0) states at the start of every (sigma, image): the stream advances over all images for
    sigmas[0], then sigmas[1], ... drawing ``randn(*shape)`` per image. Cached per pack/crop."""
    if cache_key not in _STREAM_CACHE:
        rs = np.random.RandomState(0)
        states = {}
        for s in sigmas:
            for i, shape in enumerate(shapes):
                states[(s, i)] = rs.get_state()
                rs.randn(*shape)
        _STREAM_CACHE[cache_key] = states
    return _STREAM_CACHE[cache_key]


@DATASET_REGISTRY.register()
class AllInOneTestDataset(data.Dataset):
    """Whole test images of one task pack, with deterministic protocol noise for denoising.

    Use one instance per task (and per σ for denoising) so that BasicSR reports metrics per dataset.

    Args:
        opt (dict): Options:
            dataroot (str): Pack root.
            task (str): One task name.
            split (str): Pack split, default ``'test'``.
            protocol (str): ``'3task'`` (default: ×16 centre crop; noise from one NumPy RandomState(0)
                advanced over the sorted images for each of ``protocol_sigmas`` in turn, truncated to uint8)
                or ``'5task'`` (no crop; noise from ``torch.Generator().manual_seed(3407 + index)``, rounded
                to uint8).
            sigma (float): Noise level of a denoising set (required for ``task: denoise``).
            protocol_sigmas (list[float]): Order of the σ passes of the 3-task stream, default (15, 25, 50).
            crop_multiple (int | None): Override the protocol's crop multiple.
            center_crop (int | None): Extra centre crop after the noise (quick validation), default None.
            max_images (int | None): Keep the first N images (sorted keys); noise stays that of the full set.
            io_backend (dict): ``{type: lmdb}``.

    Sample:
        lq, gt (Tensor): (3, H, W) float32 RGB in [0, 1] (noise already applied; no pending ``sigma``).
        task (Tensor): int64 task id; task_name (str); noise_level (Tensor): float32 σ of ``lq`` (0 if none).
        key (str): ``'<task>/<lmdb key>'``; lq_path, gt_path (str) (denoising lq_path ends in ``_s<σ>``).
    """

    option_keys = ('dataroot', 'task', 'split', 'protocol', 'sigma', 'protocol_sigmas', 'crop_multiple',
                   'center_crop', 'max_images', 'io_backend')

    def __init__(self, opt):
        super().__init__()
        check_dataset_keys(opt, self.option_keys, type(self).__name__)
        self.opt = opt
        if not opt.get('dataroot'):
            raise ValueError("AllInOneTestDataset: option 'dataroot' is required")
        if 'task' not in opt:
            raise ValueError("AllInOneTestDataset: option 'task' is required (one of denoise, derain, dehaze, "
                             'deblur, lowlight)')
        backend = (opt.get('io_backend') or {'type': 'lmdb'}).get('type', 'lmdb')
        if backend != 'lmdb':
            raise ValueError(f"AllInOneTestDataset: io_backend type {backend!r} is not supported (use lmdb)")
        self.task = check_task(opt['task'], 'task')
        self.protocol = opt.get('protocol', '3task')
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"AllInOneTestDataset: option 'protocol' must be one of {list(PROTOCOLS)}, "
                             f'got {self.protocol!r}')
        self.crop_multiple = opt.get('crop_multiple', PROTOCOLS[self.protocol]['crop_multiple'])
        self.center_crop = opt.get('center_crop')
        self.pack = TaskPack(opt['dataroot'], opt.get('split', 'test'), self.task)
        self.all_keys = self.pack.keys
        if not self.all_keys:
            raise ValueError(f"AllInOneTestDataset: pack {self.pack.dir} is empty")
        n = opt.get('max_images')
        self.keys = self.all_keys if n is None else self.all_keys[:int(n)]
        self.sigma = 0.0
        self.protocol_sigmas = [float(s) for s in opt.get('protocol_sigmas', DEFAULT_SIGMAS)]
        if self.task == 'denoise':
            if opt.get('sigma') is None:
                raise ValueError("AllInOneTestDataset: task 'denoise' needs option 'sigma' (e.g. 15, 25 or 50); "
                                 'make one dataset per sigma')
            self.sigma = float(opt['sigma'])
            if self.protocol == '3task' and self.sigma not in self.protocol_sigmas:
                raise ValueError(f"AllInOneTestDataset: sigma {self.sigma:g} is not in protocol_sigmas "
                                 f'{self.protocol_sigmas} (the 3-task noise stream runs over those in order)')
        elif opt.get('sigma'):
            raise ValueError(f"AllInOneTestDataset: option 'sigma' only applies to task 'denoise', not {self.task!r}")

    def __len__(self):
        return len(self.keys)

    def _cropped_shape(self, key):
        h, w, c = self.pack.gt.shape(key)
        if self.crop_multiple and self.crop_multiple > 1:
            h, w = h - h % self.crop_multiple, w - w % self.crop_multiple
        return (h, w, c)

    def _noisy(self, clean, index):
        if self.protocol == '5task':
            return protocol_noise_torch(clean, self.sigma, FIVE_TASK_SEED + index)
        shapes = [self._cropped_shape(k) for k in self.all_keys]
        cache_key = (self.pack.gt.lmdb_path, self.crop_multiple, tuple(self.protocol_sigmas), tuple(shapes))
        states = _numpy_stream_states(shapes, self.protocol_sigmas, cache_key)
        rs = np.random.RandomState()
        rs.set_state(states[(self.sigma, index)])
        return protocol_noise_numpy(clean, self.sigma, rs)

    def __getitem__(self, index):
        key = self.keys[index]
        lq, gt = self.pack.read_pair(key)
        gt = crop_to_multiple(gt, self.crop_multiple)
        if lq is None:
            lq = self._noisy(gt, index)
            lq_path = f'{self.pack.gt_path(key)}_s{self.sigma:g}'
        else:
            lq = crop_to_multiple(lq, self.crop_multiple)
            lq_path = self.pack.lq_path(key)
        if self.center_crop:
            lq, gt = center_crop(lq, self.center_crop), center_crop(gt, self.center_crop)
        return {
            'lq': to_tensor(lq),
            'gt': to_tensor(gt),
            'task': torch.tensor(TASK_IDS[self.task], dtype=torch.int64),
            'task_name': self.task,
            'noise_level': torch.tensor(self.sigma, dtype=torch.float32),
            'key': f'{self.task}/{key}',
            'lq_path': lq_path,
            'gt_path': self.pack.gt_path(key),
        }
