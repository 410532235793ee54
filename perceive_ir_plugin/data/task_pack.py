"""One packed task (``<root>/<split>/<task>``): its description, readers and paired reads."""
import os

from basicsr.utils import get_root_logger

from perceive_ir_plugin.data.lmdb_io import LmdbImageReader, PackError
from perceive_ir_plugin.data.pack_layout import pack_dir, read_pack_info
from perceive_ir_plugin.data.tasks import check_task


class TaskPack:
    """Read access to one task pack; LMDB environments open lazily in each process (worker-safe).

    Args:
        root (str): Pack root (option ``dataroot``).
        split (str): ``'train'`` or ``'test'``.
        task (str): Task name.

    Attributes:
        info (dict): ``pack.json``.
        keys (list[str]): Sorted record keys (shared by ``lq.lmdb`` and ``gt.lmdb``).
        has_lq (bool): Whether degraded images are stored (``False`` for denoising).
    """

    def __init__(self, root, split, task):
        check_task(task, 'tasks')
        self.task, self.split = task, split
        self.dir = pack_dir(root, split, task)
        self.info = read_pack_info(self.dir, task=task, split=split)
        self.gt = LmdbImageReader(os.path.join(self.dir, 'gt.lmdb'), task=task)
        self.has_lq = bool(self.info.get('has_lq', True))
        self.lq = LmdbImageReader(os.path.join(self.dir, 'lq.lmdb'), task=task) if self.has_lq else None
        keys = set(self.gt.keys)
        if self.lq is not None and set(self.lq.keys) != keys:
            only_lq = sorted(set(self.lq.keys) - keys)
            only_gt = sorted(keys - set(self.lq.keys))
            raise PackError(f"Pack {self.dir} (task '{task}'): lq.lmdb and gt.lmdb list different keys; "
                            f'only in lq: {only_lq[:10]}, only in gt: {only_gt[:10]}. Re-run `perceive-ir pack`.')
        if self.info.get('count') not in (None, len(keys)):
            get_root_logger().warning(f"{self.dir}: pack.json says {self.info.get('count')} records, "
                                      f'meta_info.txt lists {len(keys)}')
        self.keys = sorted(keys)

    def gt_path(self, key):
        return f'{self.gt.lmdb_path}/{key}'

    def lq_path(self, key):
        return f'{(self.lq or self.gt).lmdb_path}/{key}'

    def read_pair(self, key):
        """``(lq or None, gt)`` as (H, W, 3) uint8 RGB arrays; raises if their sizes differ."""
        gt = self.gt.read(key)
        if self.lq is None:
            return None, gt
        lq = self.lq.read(key)
        if lq.shape != gt.shape:
            raise PackError(f"Task '{self.task}', key {key!r} in {self.dir}: LQ is {lq.shape[1]}x{lq.shape[0]} but "
                            f'GT is {gt.shape[1]}x{gt.shape[0]} (W x H); pairs must have equal sizes')
        return lq, gt
