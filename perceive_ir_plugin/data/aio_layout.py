"""Where the all-in-one benchmark folders live (PromptIR / AdaIR / Perceive-IR release layouts).

Recognised (folder names matched case-insensitively, the first candidate that exists wins)::

    ROOT/Train/Denoise/[gt/]*                 clean BSD400 + WED images (noise is added at load time)
    ROOT/Train/Derain/{rainy|input}/rain-X    <-> {gt|target}/norain-X       (Rain100L train)
    ROOT/Train/Dehaze/{synthetic|hazy|input}/**/ID_beta_A <-> {original|clear|gt|target}/ID (RESIDE OTS)
    ROOT/Train/Deblur/{blur|input}/X          <-> {sharp|gt|target}/X        (GoPro)
    ROOT/Train/{Enhance|lowlight|LOL}/{low|input}/X <-> {gt|high|normal|target}/X   (LOL-v1)
    ROOT/test/denoise/{bsd68|cbsd68}/[target/]*                              (BSD68)
    ROOT/test/derain/[Rain100L/]{input|rainy} <-> {target|gt|norain}
    ROOT/test/dehaze/[SOTS/outdoor|outdoor/]{input|hazy} <-> {target|gt|clear}   (by scene id)
    ROOT/test/deblur/[gopro/]{input|blur}     <-> {target|sharp|gt}
    ROOT/test/{enhance|lowlight}/[lol/]{input|low} <-> {target|high|gt}
"""
import os
from dataclasses import dataclass

from perceive_ir_plugin.data.lmdb_io import PackError

_TRAIN = {
    'denoise': (('Denoise',), None, ('gt', 'clean', 'target'), None),
    'derain': (('Derain',), ('rainy', 'input', 'rain'), ('gt', 'norain', 'target'), 'rain'),
    'dehaze': (('Dehaze',), ('synthetic', 'hazy', 'input'), ('original', 'clear', 'gt', 'target'), 'scene'),
    'deblur': (('Deblur', 'GoPro'), ('blur', 'input'), ('sharp', 'gt', 'target'), 'same'),
    'lowlight': (('Enhance', 'lowlight', 'LOL'), ('low', 'input'), ('gt', 'high', 'normal', 'target'), 'same'),
}
_TEST = {
    'denoise': (('denoise',), ('bsd68', 'cbsd68', 'BSD68'), None, ('target', 'gt', 'clean'), None),
    'derain': (('derain',), ('Rain100L',), ('input', 'rainy'), ('target', 'gt', 'norain'), 'rain'),
    'dehaze': (('dehaze',), ('SOTS/outdoor', 'outdoor', 'SOTS'), ('input', 'hazy'), ('target', 'gt', 'clear'), 'scene'),
    'deblur': (('deblur',), ('gopro', 'GoPro'), ('input', 'blur'), ('target', 'sharp', 'gt'), 'same'),
    'lowlight': (('enhance', 'lowlight'), ('lol', 'LOL'), ('input', 'low'), ('target', 'high', 'gt'), 'same'),
}
_SPLIT_DIRS = {'train': ('Train', 'train'), 'test': ('test', 'Test')}


@dataclass
class TaskSource:
    """Source folders of one (split, task): ``lq_dir`` is None for clean-only (denoising) sources."""
    split: str
    task: str
    gt_dir: str
    lq_dir: str = None
    rule: str = None


def find_dir(base, *candidates):
    """First existing sub-folder of ``base`` among ``candidates`` (each may be a nested 'a/b' path),
    matching every path component case-insensitively; ``None`` when none exists."""
    if base is None:
        return None
    for cand in candidates:
        cur = base
        for part in cand.split('/'):
            if not os.path.isdir(cur):
                cur = None
                break
            names = {n.lower(): n for n in os.listdir(cur) if os.path.isdir(os.path.join(cur, n))}
            hit = part if part in names.values() else names.get(part.lower())
            cur = os.path.join(cur, hit) if hit else None
            if cur is None:
                break
        if cur is not None and os.path.isdir(cur):
            return cur
    return None


def discover_aio(root, splits=('train', 'test'), tasks=None):
    """Find the source folders of every (split, task) present under ``root``.

    Args:
        root (str): Data root holding ``Train/`` and/or ``test/``.
        splits (Sequence[str]): Splits to look for.
        tasks (Sequence[str] | None): Tasks required (missing ones raise); ``None`` takes what exists.

    Returns:
        tuple[list[TaskSource], list[str]]: Sources found, and notes on what was not found.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f'Data root not found: {root}')
    found, notes = [], []
    for split in splits:
        base = find_dir(root, *_SPLIT_DIRS[split])
        for task in (tasks or _TRAIN):
            if split == 'train':
                names, lq_names, gt_names, rule = _TRAIN[task]
                task_dir = find_dir(base, *names)
                sub = task_dir
            else:
                names, sub_names, lq_names, gt_names, rule = _TEST[task]
                task_dir = find_dir(base, *names)
                sub = find_dir(task_dir, *sub_names) or task_dir
            if task_dir is None:
                msg = (f"{split}/{task}: no folder {' or '.join(names)} under "
                       f"{base or os.path.join(root, _SPLIT_DIRS[split][0])}")
                if tasks:
                    raise PackError(msg)
                notes.append(msg + ' (skipped)')
                continue
            if lq_names is None:
                gt_dir = find_dir(sub, *gt_names) or sub
                found.append(TaskSource(split, task, gt_dir))
                continue
            lq_dir, gt_dir = find_dir(sub, *lq_names), find_dir(sub, *gt_names)
            if lq_dir is None or gt_dir is None:
                missing = [f"{'/'.join(n)}" for d, n in ((lq_dir, lq_names), (gt_dir, gt_names)) if d is None]
                raise PackError(f"{split}/{task}: {sub} has no {' and no '.join(missing)} folder "
                                f"(found: {sorted(os.listdir(sub))})")
            found.append(TaskSource(split, task, gt_dir, lq_dir, rule))
    if not found:
        raise PackError(f'No all-in-one task folders found under {root}:\n  ' + '\n  '.join(notes))
    return found, notes
