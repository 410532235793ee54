"""Packing source images into task packs: image loading with explicit conversions, LQ/GT pairing
rules of the all-in-one datasets, and the resumable per-task pack writer.

Conversions when reading a source image (each is counted and logged, nothing silent):

- grey (1 channel) -> RGB by replicating the channel;
- 16-bit -> 8-bit by ``round(v / 257)`` (packs are uint8 like every pipeline of the method);
- RGBA / grey+alpha whose alpha is fully opaque -> alpha dropped;
- RGBA with transparent pixels, float images or anything else -> refused (:class:`PackError` naming the
  file): there is no right background to composite onto, flatten such images yourself.
"""
import os
from collections import Counter

import cv2
import numpy as np
from basicsr.utils import get_root_logger

from perceive_ir_plugin.data.lmdb_io import LmdbImageWriter, PackError, sanitize_key
from perceive_ir_plugin.data.pack_layout import PACK_JSON, pack_dir, write_pack_info
from perceive_ir_plugin.data.tasks import check_task

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
PAIR_RULES = ('same', 'rain', 'scene')


class PairingError(PackError):
    """LQ and GT folders do not pair up; the message lists every unmatched file."""


def list_images(folder):
    """Sorted image paths under ``folder`` (recursive, hidden entries skipped), relative, '/'-separated."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'Image folder not found: {folder}')
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in files:
            if not name.startswith('.') and name.lower().endswith(IMG_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/'))
    return sorted(out)


def load_image_rgb(path, notes=None):
    """Read an image file as (H, W, 3) uint8 RGB, converting or refusing as the module docstring says.

    Args:
        path (str): Image file.
        notes (Counter | None): Receives one count per conversion made (``'grey->RGB'``, ...).
    """
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise PackError(f'Cannot read image file {path}: {err}') from err
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise PackError(f'Cannot decode image {path} (corrupt, empty or unsupported format)')
    notes = Counter() if notes is None else notes
    if img.dtype == np.uint16:
        img = np.round(img.astype(np.float32) / 257.0).astype(np.uint8)
        notes['16-bit->8-bit'] += 1
    elif img.dtype != np.uint8:
        raise PackError(f'{path}: {img.dtype} images are not supported (expected 8- or 16-bit); '
                        'convert it to an 8-bit PNG first')
    if img.ndim == 3 and img.shape[2] in (2, 4):
        alpha = img[..., -1]
        if alpha.min() < 255:
            raise PackError(f'{path} has transparent pixels (alpha channel, min alpha {int(alpha.min())}); '
                            'refusing to guess a background: flatten the image onto one and re-run')
        img = img[..., :-1]
        notes['opaque alpha dropped'] += 1
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
        notes['grey->RGB'] += 1
    elif img.ndim != 3 or img.shape[2] != 3:
        raise PackError(f'{path}: unsupported image shape {img.shape}')
    else:
        img = img[..., ::-1]
    return np.ascontiguousarray(img)


def _pair_id(rel, rule, side):
    stem = os.path.splitext(rel)[0]
    head, base = os.path.split(stem)
    if rule == 'same':
        return stem
    if rule == 'rain':
        for prefix in (('rain-', 'rain_') if side == 'lq' else ('norain-', 'norain_')):
            if base.lower().startswith(prefix):
                base = base[len(prefix):]
                break
        return f'{head}/{base}' if head else base
    if rule == 'scene':
        return base.split('_')[0]
    raise PackError(f"Unknown pairing rule {rule!r}; use one of {', '.join(PAIR_RULES)}")


def pair_folders(lq_dir, gt_dir, rule='same', task=None, allow_unpaired=False):
    """Pair the images of an LQ and a GT folder.

    Rules: ``'same'`` (same relative path without extension), ``'rain'`` (``rain-X`` <-> ``norain-X``,
    identical names also match), ``'scene'`` (RESIDE: hazy ``<id>_<beta>_<A>`` <-> clear ``<id>``, the text
    before the first ``_``; one clear image serves many hazy ones).

    Args:
        lq_dir (str): Degraded images.
        gt_dir (str): Ground truths.
        rule (str): Pairing rule.
        task (str | None): Task name for messages.
        allow_unpaired (bool): Skip unmatched files with a warning instead of raising.

    Returns:
        list[tuple[str, str, str]]: ``(key, lq_path, gt_path)`` sorted by key; key =
        :func:`sanitize_key` of the LQ relative path without extension.

    Raises:
        PairingError: Lists every LQ file without GT, every GT without LQ (one-to-one rules), and GT
            files that claim the same id.
    """
    lq_files, gt_files = list_images(lq_dir), list_images(gt_dir)
    gt_by_id, problems = {}, []
    for rel in gt_files:
        pid = _pair_id(rel, rule, 'gt')
        if pid in gt_by_id:
            problems.append(f'GT files {os.path.join(gt_dir, gt_by_id[pid])} and {os.path.join(gt_dir, rel)} '
                            f'both match id {pid!r}')
        else:
            gt_by_id[pid] = rel
    pairs, used, keys, unmatched = [], set(), {}, []
    for rel in lq_files:
        pid = _pair_id(rel, rule, 'lq')
        gt_rel = gt_by_id.get(pid)
        if gt_rel is None:
            unmatched.append(f'LQ without GT: {os.path.join(lq_dir, rel)} (looked for id {pid!r})')
            continue
        if rule != 'scene' and gt_rel in used:
            problems.append(f'GT {os.path.join(gt_dir, gt_rel)} matches several LQ files, e.g. '
                            f'{os.path.join(lq_dir, rel)}')
            continue
        used.add(gt_rel)
        key = sanitize_key(os.path.splitext(rel)[0])
        if key in keys:
            problems.append(f'LQ files {os.path.join(lq_dir, keys[key])} and {os.path.join(lq_dir, rel)} map to '
                            f'the same key {key!r}')
            continue
        keys[key] = rel
        pairs.append((key, os.path.join(lq_dir, rel), os.path.join(gt_dir, gt_rel)))
    if rule != 'scene':
        unmatched += [f'GT without LQ: {os.path.join(gt_dir, rel)}' for rel in gt_files if rel not in used]
    where = f"task '{task}': " if task else ''
    if problems:
        raise PairingError(f'{where}pairing {lq_dir} with {gt_dir} (rule {rule!r}) is ambiguous:\n  '
                           + '\n  '.join(problems))
    if unmatched:
        if not allow_unpaired:
            raise PairingError(f'{where}{len(unmatched)} unmatched file(s) pairing {lq_dir} with {gt_dir} '
                               f'(rule {rule!r}; pass --allow-unpaired to skip them):\n  ' + '\n  '.join(unmatched))
        get_root_logger().warning(f'{where}skipping {len(unmatched)} unmatched file(s):\n  ' + '\n  '.join(unmatched))
    if not pairs:
        raise PairingError(f'{where}no LQ/GT pairs found in {lq_dir} and {gt_dir} (rule {rule!r})')
    return sorted(pairs)


def clean_items(gt_dir):
    """``(key, None, gt_path)`` for every image of a clean-only folder (denoising), sorted by key."""
    items, keys = [], {}
    for rel in list_images(gt_dir):
        key = sanitize_key(os.path.splitext(rel)[0])
        if key in keys:
            raise PackError(f'{os.path.join(gt_dir, keys[key])} and {os.path.join(gt_dir, rel)} map to the same '
                            f'key {key!r}')
        keys[key] = rel
        items.append((key, None, os.path.join(gt_dir, rel)))
    if not items:
        raise PackError(f'No images found in {gt_dir}')
    return items


def _load(src, notes):
    if src is None:
        return None
    if isinstance(src, np.ndarray):
        return src
    if callable(src):
        return src()
    return load_image_rgb(src, notes)


def _describe(src):
    return src if isinstance(src, str) else '<generated>'


def write_task_pack(out_root, split, task, items, fmt='png', compress_level=1, source=None, progress=True,
                    map_size=None):
    """Write (or resume) the pack ``<out_root>/<split>/<task>``.

    Records already present are skipped and never rewritten. ``pack.json`` is removed while records are
    being added and written (atomically) once the pack is complete, so an interrupted pack is recognisable
    and the same call resumes it.

    Args:
        out_root (str): Pack root.
        split (str): ``'train'`` or ``'test'``.
        task (str): Task name.
        items (list[tuple]): ``(key, lq_src, gt_src)``; a source is a file path, an (H, W, 3) uint8 RGB
            array or a callable returning one; ``lq_src`` is ``None`` for every item of a clean-only pack.
        fmt (str): ``'png'`` or ``'raw'``.
        compress_level (int): PNG compression level.
        source (dict | str | None): Provenance stored in ``pack.json``.
        progress (bool): Show a tqdm bar.
        map_size (int | None): Initial LMDB map size.

    Returns:
        dict: The ``pack.json`` content plus ``added`` and ``skipped`` counts.
    """
    check_task(task)
    if not items:
        raise PackError(f"Nothing to pack for task '{task}' (split '{split}')")
    has_lq = items[0][1] is not None
    if any((lq is not None) != has_lq for _, lq, _ in items):
        raise PackError(f"task '{task}': either every item or none must have an LQ image")
    directory = pack_dir(out_root, split, task)
    os.makedirs(directory, exist_ok=True)
    gt_w = LmdbImageWriter(os.path.join(directory, 'gt.lmdb'), fmt, compress_level, map_size, task=task)
    lq_w = LmdbImageWriter(os.path.join(directory, 'lq.lmdb'), fmt, compress_level, map_size,
                           task=task) if has_lq else None
    notes, added, skipped = Counter(), 0, 0
    todo = [it for it in items if it[0] not in gt_w or (lq_w is not None and it[0] not in lq_w)]
    skipped = len(items) - len(todo)
    try:
        if todo and os.path.exists(os.path.join(directory, PACK_JSON)):
            os.remove(os.path.join(directory, PACK_JSON))  # incomplete until the end of this call
        iterator = todo
        if progress and todo:
            from tqdm import tqdm
            iterator = tqdm(todo, desc=f'pack {split}/{task}', unit='img')
        for key, lq_src, gt_src in iterator:
            gt = _load(gt_src, notes)
            lq = _load(lq_src, notes)
            if lq is not None and lq.shape != gt.shape:
                raise PackError(f"task '{task}', key {key!r}: LQ {_describe(lq_src)} is {lq.shape[1]}x{lq.shape[0]} "
                                f'but GT {_describe(gt_src)} is {gt.shape[1]}x{gt.shape[0]} (W x H); '
                                'pairs must have equal sizes')
            if lq_w is not None:
                lq_w.put(key, lq)
            gt_w.put(key, gt)
            added += 1
        gt_w.flush()
        if lq_w is not None:
            lq_w.flush()
            if lq_w.keys_done != gt_w.keys_done:
                diff = sorted(lq_w.keys_done ^ gt_w.keys_done)
                raise PackError(f'{directory}: lq.lmdb and gt.lmdb hold different keys ({diff[:10]} ...); the pack '
                                'was filled from different sources. Pack into a new folder.')
        count = len(gt_w)
    finally:
        gt_w.close()
        if lq_w is not None:
            lq_w.close()
    if notes:
        get_root_logger().info(f'{split}/{task}: converted ' + ', '.join(f'{n} x {k}' for k, n in notes.items()))
    extra = count - len(items)
    if extra > 0:
        get_root_logger().warning(f'{directory} holds {extra} record(s) that this source does not list '
                                  '(packed earlier from another source); they are kept')
    info = {'task': task, 'split': split, 'count': count, 'format': fmt, 'has_lq': has_lq,
            'compress_level': compress_level if fmt == 'png' else 0, 'source': source,
            'lq_synthesized': None if has_lq else ('gaussian' if task == 'denoise' else None)}
    if todo or not os.path.exists(os.path.join(directory, PACK_JSON)):
        write_pack_info(directory, info)
    return dict(info, added=added, skipped=skipped)
