"""``perceive-ir render-medium``: build Perceive-IR's stage-1 quality triplets (low / medium / high).

Stage 1 needs, for every training sample, a *medium*-quality image: the output of a
deliberately short-trained restorer run on the degraded (*low*) input, the ground truth
being *high*. With 2-fold cross-fitting (SPEC §2.3), the model trained on the samples
outside fold k (``options/train/PerceiveIR/stage1_medium_fold{k}.yml``) renders fold k,
so no medium image comes from a model that saw it. Fold = ``fold_of(task, lmdb_key)``.

Example (after training both fold models)::

    perceive-ir render-medium -opt options/train/PerceiveIR/stage1_medium_fold0.yml \\
        --checkpoints experiments/stage1_medium_fold0/models/net_g_20000.pth \\
                      experiments/stage1_medium_fold1/models/net_g_20000.pth \\
        --dataroot datasets/AiO --out datasets/AiO_stage1 --device cuda --bf16

Output (``--out``)::

    <out>/<task>/medium.lmdb    medium images, same keys as <dataroot>/<split>/<task>/gt.lmdb
    <out>/denoise/lq.lmdb       the rendered noisy low images (denoising has no stored LQ)
    <out>/manifest.jsonl        one triplet per line: task, key, fold, sigma, noise_seed,
                                low, medium, high (LMDB folders, relative to <out> when inside it)
    <out>/triplets.json         what was rendered (written last: its presence marks completion)

Denoising: each clean image gets one σ, cycling ``--sigmas`` (15, 25, 50) over the sorted
keys, and Gaussian noise from a seed derived from SHA1("denoise|<key>|<--seed>"), so the
low images are reproducible; they are quantised to uint8 and stored. Rendering uses
padded (reflect, to the network's size multiple), overlapping-tile inference (tile 512,
overlap 32), an optional bf16 autocast on CUDA, and clamps the output to [0, 1] before
quantising to uint8 PNG records. An interrupted run resumes: records already packed are
kept, only the missing ones are rendered.
"""
import hashlib
import json
import os
import sys

import numpy as np

from perceive_ir_plugin.data.tasks import DEFAULT_SIGMAS, TASKS

MANIFEST = 'manifest.jsonl'
INFO = 'triplets.json'
VERSION = 1


def denoise_noise_plan(keys, sigmas=DEFAULT_SIGMAS, seed=0):
    """σ and noise seed of every clean denoising image.

    Args:
        keys (Iterable[str]): LMDB keys of the clean images.
        sigmas (Sequence[int]): Noise levels, cycled over the sorted keys.
        seed (int): Base seed mixed into every per-image seed.

    Returns:
        dict[str, tuple[int, int]]: key → (σ on the 0-255 scale, 63-bit seed).
    """
    plan = {}
    for index, key in enumerate(sorted(keys)):
        digest = hashlib.sha1(f'denoise|{key}|{int(seed)}'.encode('utf-8')).hexdigest()
        plan[key] = (int(sigmas[index % len(sigmas)]), int(digest[:16], 16) >> 1)
    return plan


def render_noisy(clean, sigma, seed):
    """Deterministic noisy low image: ``clip(round(clean + sigma * N(0, 1)))``.

    Args:
        clean (np.ndarray): (H, W, 3) uint8 RGB.
        sigma (float): Noise standard deviation on the 0-255 scale.
        seed (int): Seed of the ``np.random.default_rng`` drawing the float32 normals.

    Returns:
        np.ndarray: (H, W, 3) uint8 RGB.
    """
    noise = np.random.default_rng(seed).standard_normal(clean.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(np.round(clean.astype(np.float32) + noise), 0, 255).astype(np.uint8)


def _relpath(path, root):
    path, root = os.path.abspath(path), os.path.abspath(root)
    return os.path.relpath(path, root) if os.path.commonpath([path, root]) == root else path


def _load_models(network_opt, checkpoints, device, trust):
    from basicsr.archs import build_network

    from perceive_ir_plugin.utils.checkpoint import load_checkpoint_into
    nets = []
    for index, path in enumerate(checkpoints):
        net = build_network(dict(network_opt))
        load_checkpoint_into(net, path, strict=True, trust=trust, option_key=f'--checkpoints[{index}] (fold {index})')
        nets.append(net.to(device).eval())
    return nets


def _restore(net, low, device, tile, overlap, bf16):
    import torch

    from perceive_ir_plugin.utils.tiling import tiled_forward
    x = torch.from_numpy(np.ascontiguousarray(low)).permute(2, 0, 1).float().div(255.0).unsqueeze(0).to(device)
    multiple = int(getattr(net, 'size_multiple', 1) or 1)
    use_bf16 = bf16 and x.device.type == 'cuda'
    with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = tiled_forward(net, x, tile=tile or None, overlap=overlap, multiple=multiple, pad_mode='reflect')
    out = out.float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return out[0].permute(1, 2, 0).cpu().numpy()


def render_medium(dataroot, out, network_opt, checkpoints, split='train', tasks=None, sigmas=DEFAULT_SIGMAS, seed=0,
                  tile=512, overlap=32, device='cpu', bf16=False, trust=False, log=None):
    """Render the medium tier of every sample and write the triplet manifest.

    Args:
        dataroot (str): Packed data root (``<dataroot>/<split>/<task>/{gt,lq}.lmdb``).
        out (str): Output folder (see the module docstring).
        network_opt (dict): ``network_g`` options of the medium restorer.
        checkpoints (Sequence[str]): One weights file per fold; entry k renders fold k.
        split (str): ``train`` (default) or ``test``.
        tasks (Sequence[str], optional): Tasks to render; default every packed task.
        sigmas (Sequence[int]): Denoising noise levels cycled over the sorted keys.
        seed (int): Base seed of the denoising noise.
        tile (int): Tile size (0 = whole image); overlap (int): tile overlap.
        device (str): Torch device; bf16 (bool): bf16 autocast (CUDA only).
        trust (bool): Allow pickled objects in the checkpoints.
        log (callable, optional): Progress messages.

    Returns:
        dict: The ``triplets.json`` content (per-task and per-fold counts included).
    """
    import torch

    from perceive_ir_plugin.data.folds import fold_of
    from perceive_ir_plugin.data.lmdb_io import LmdbImageWriter, PackError
    from perceive_ir_plugin.data.quality_triplet_dataset import release_shared_readers, shared_reader
    from perceive_ir_plugin.data.pack_layout import pack_dir, read_pack_info
    from perceive_ir_plugin.data.tasks import check_task
    from perceive_ir_plugin.utils.atomic_io import atomic_write

    log = log or (lambda msg: None)
    if len(checkpoints) < 2:
        raise ValueError(f'--checkpoints needs one model per fold (at least 2), got {len(checkpoints)}.')
    n_folds = len(checkpoints)
    if tasks:
        tasks = [check_task(t, option_key='--tasks') for t in tasks]
    else:
        tasks = [t for t in TASKS if os.path.isdir(pack_dir(dataroot, split, t))]
        if not tasks:
            raise FileNotFoundError(f"No packed task under '{os.path.join(str(dataroot), split)}' (--dataroot, "
                                    f'split {split!r}); create the packs with `perceive-ir pack`.')
    device = torch.device(device)
    nets = _load_models(network_opt, checkpoints, device, trust)
    os.makedirs(out, exist_ok=True)
    release_shared_readers(out)  # py-lmdb: a pack read in this process must be closed before writing it
    entries, counts = [], {}
    for task in tasks:
        src = pack_dir(dataroot, split, task)
        read_pack_info(src, task=task, split=split)
        gt_reader = shared_reader(os.path.join(src, 'gt.lmdb'), task=task)
        lq_path = os.path.join(src, 'lq.lmdb')
        synthesise = not os.path.isdir(lq_path)
        if synthesise and task != 'denoise':
            raise PackError(f"Task '{task}' has no lq.lmdb in {src}; only denoising synthesises its low images.")
        lq_reader = None if synthesise else shared_reader(lq_path, task=task)
        keys = sorted(gt_reader.keys)
        plan = denoise_noise_plan(keys, sigmas, seed) if synthesise else {}
        task_out = os.path.join(out, task)
        os.makedirs(task_out, exist_ok=True)
        medium_path = os.path.join(task_out, 'medium.lmdb')
        low_path = os.path.join(task_out, 'lq.lmdb') if synthesise else lq_path
        medium_writer = LmdbImageWriter(medium_path, fmt='png', task=task)
        low_writer = LmdbImageWriter(low_path, fmt='png', task=task) if synthesise else None
        rendered = 0
        try:
            for key in keys:
                fold = fold_of(task, key, n_folds)
                sigma, noise_seed = plan.get(key, (0, 0))
                need_low = low_writer is not None and key not in low_writer
                if need_low or key not in medium_writer:
                    if synthesise:
                        low = render_noisy(gt_reader.read(key), sigma, noise_seed)
                    else:
                        if key not in lq_reader:
                            raise PackError(f"Key {key!r} of task '{task}' is in gt.lmdb but not in {lq_path}.")
                        low = lq_reader.read(key)
                    if need_low:
                        low_writer.put(key, low)
                    if key not in medium_writer:
                        medium_writer.put(key, _restore(nets[fold], low, device, tile, overlap, bf16))
                        rendered += 1
                entries.append({'task': task, 'key': key, 'fold': fold, 'sigma': sigma, 'noise_seed': noise_seed,
                                'low': _relpath(low_path, out), 'medium': _relpath(medium_path, out),
                                'high': _relpath(os.path.join(src, 'gt.lmdb'), out)})
        finally:
            medium_writer.close()
            if low_writer is not None:
                low_writer.close()
        per_fold = [sum(1 for e in entries if e['task'] == task and e['fold'] == k) for k in range(n_folds)]
        counts[task] = {'count': len(keys), 'rendered': rendered, 'per_fold': per_fold}
        log(f'{task}: {len(keys)} triplets ({rendered} rendered now, {len(keys) - rendered} resumed), '
            f'folds {per_fold}')
    atomic_write(os.path.join(out, MANIFEST),
                 lambda f: f.write(''.join(json.dumps(e, sort_keys=True) + '\n' for e in entries)), mode='w')
    info = {'version': VERSION, 'dataroot': os.path.abspath(str(dataroot)), 'split': split, 'tasks': counts,
            'n_folds': n_folds, 'checkpoints': [os.path.abspath(c) for c in checkpoints],
            'network_g': dict(network_opt), 'sigmas': [int(s) for s in sigmas], 'seed': int(seed),
            'tile': int(tile or 0), 'overlap': int(overlap), 'bf16': bool(bf16)}
    atomic_write(os.path.join(out, INFO), lambda f: f.write(json.dumps(info, indent=2, sort_keys=True) + '\n'),
                 mode='w')
    return info


def run(args):
    """Entry point of ``perceive-ir render-medium``."""
    import yaml

    import perceive_ir_plugin  # noqa: F401  (registers the archs)
    from perceive_ir_plugin.utils.checkpoint import CheckpointError

    with open(args.opt, 'r', encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    if not isinstance(opt, dict) or 'network_g' not in opt:
        print(f"error: option file '{args.opt}' has no network_g section.", file=sys.stderr)
        return 2
    dataroot = args.dataroot or ((opt.get('datasets') or {}).get('train') or {}).get('dataroot')
    if not dataroot:
        print('error: give --dataroot (the option file has no datasets.train.dataroot).', file=sys.stderr)
        return 2
    device = args.device
    if device == 'auto':
        import torch
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        info = render_medium(dataroot, args.out, opt['network_g'], args.checkpoints, split=args.split,
                             tasks=args.tasks, sigmas=args.sigmas, seed=args.seed, tile=args.tile,
                             overlap=args.overlap, device=device, bf16=args.bf16, trust=args.trust_checkpoint,
                             log=print)
    except (FileNotFoundError, CheckpointError, ValueError, RuntimeError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f"\n| task | triplets | {' | '.join(f'fold {k}' for k in range(info['n_folds']))} |")
    print('|---|---|' + '---|' * info['n_folds'])
    for task, c in info['tasks'].items():
        print(f"| {task} | {c['count']} | {' | '.join(str(n) for n in c['per_fold'])} |")
    print(f"\nManifest: {os.path.join(args.out, MANIFEST)}")
    return 0


def add_parser(subparsers):
    """Register ``render-medium``."""
    parser = subparsers.add_parser('render-medium', help="Render stage 1's medium tier (cross-fitted) and the "
                                   'low/medium/high triplet manifest.',
                                   description=__doc__.split('\n\n')[0])
    parser.add_argument('-opt', required=True, help='Option file of the medium restorer (its network_g is used).')
    parser.add_argument('--checkpoints', nargs='+', required=True,
                        help='One weights file per fold, in fold order: entry k renders fold k (it must be the '
                        'model trained WITHOUT fold k, i.e. by stage1_medium_fold{k}.yml).')
    parser.add_argument('--out', required=True, help='Output folder of the triplets.')
    parser.add_argument('--dataroot', default=None, help='Packed data root (default: datasets.train.dataroot).')
    parser.add_argument('--split', default='train', choices=('train', 'test'))
    parser.add_argument('--tasks', nargs='+', default=None, help='Tasks to render (default: every packed task).')
    parser.add_argument('--sigmas', nargs='+', type=int, default=list(DEFAULT_SIGMAS),
                        help='Denoising noise levels, cycled over the sorted keys.')
    parser.add_argument('--seed', type=int, default=0, help='Base seed of the denoising noise.')
    parser.add_argument('--tile', type=int, default=512, help='Tile size (0: whole images).')
    parser.add_argument('--overlap', type=int, default=32, help='Tile overlap.')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:1 ...')
    parser.add_argument('--bf16', action='store_true', help='bf16 autocast (CUDA only).')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='Allow pickled Python objects in the checkpoints (can run code).')
    parser.set_defaults(func=run)
