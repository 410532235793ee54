"""``perceive-ir pack``: pack image folders into the plugin's LMDB task packs.

Layouts:

- ``--layout aio ROOT OUT``: the all-in-one benchmark folders (see :mod:`perceive_ir_plugin.data.aio_layout`),
  every task and split found;
- ``--layout paired LQ GT OUT --task T [--split S] [--match same|rain|scene]``: any folder pair;
- ``--layout demo OUT``: stand-in packs from scikit-image's bundled photographs (seconds, no download).

Packing is resumable (re-running skips records already packed, never rewrites them), LMDB maps grow as
needed, and every LQ/GT pair is checked before anything is written (all unmatched files are named).
"""
import argparse
import sys

from perceive_ir_plugin.data.lmdb_io import FORMATS, PackError

LAYOUTS = ('aio', 'paired', 'demo')


def add_parser(subparsers):
    """Register the ``pack`` sub-command."""
    p = subparsers.add_parser('pack', help='pack image folders into LMDB task packs',
                              description='Pack image folders into LMDB task packs (BasicSR format).',
                              epilog='\n\n'.join(__doc__.split('\n\n')[1:]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('paths', nargs='+', metavar='PATH', help='aio: ROOT OUT; paired: LQ GT OUT; demo: OUT')
    p.add_argument('--layout', choices=LAYOUTS, required=True)
    p.add_argument('--format', choices=FORMATS, default='png', help='png (BasicSR-readable) or raw uint8 arrays')
    p.add_argument('--compress-level', type=int, default=1, help='PNG compression level (BasicSR default 1)')
    p.add_argument('--tasks', nargs='+', default=None, help='aio/demo: only these tasks')
    p.add_argument('--splits', nargs='+', default=['train', 'test'], choices=['train', 'test'])
    p.add_argument('--task', help='paired: task name of the folder pair')
    p.add_argument('--split', default='train', choices=['train', 'test'], help='paired: split (default train)')
    p.add_argument('--match', default='same', choices=['same', 'rain', 'scene'],
                   help='paired: pairing rule (same name | rain-X<->norain-X | hazy ID_x_y<->clear ID)')
    p.add_argument('--clean-only', action='store_true', help='paired: GT folder only (denoising); pass LQ as "-"')
    p.add_argument('--allow-unpaired', action='store_true', help='skip unmatched files (warn) instead of failing')
    p.add_argument('--max-side', type=int, default=None, help='demo: downscale photographs to this longest side')
    p.add_argument('--seed', type=int, default=0, help='demo: seed of the synthetic degradations')
    p.add_argument('--map-size-gb', type=float, default=None, help='initial LMDB map size (grows when full)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.set_defaults(func=run)
    return p


def _plan(args):
    """(split, task, items, source) for every pack to write; pairing is checked here, before writing."""
    from perceive_ir_plugin.data.aio_layout import discover_aio
    from perceive_ir_plugin.data.packing import clean_items, pair_folders
    from perceive_ir_plugin.data.tasks import check_task
    if args.layout == 'aio':
        if len(args.paths) != 2:
            raise PackError('--layout aio takes ROOT OUT')
        tasks = [check_task(t, '--tasks') for t in args.tasks] if args.tasks else None
        sources, notes = discover_aio(args.paths[0], args.splits, tasks)
        for note in notes:
            print(f'note: {note}', file=sys.stderr)
        plan, errors = [], []
        for src in sources:
            try:
                items = clean_items(src.gt_dir) if src.lq_dir is None else pair_folders(
                    src.lq_dir, src.gt_dir, src.rule, src.task, args.allow_unpaired)
            except PackError as err:
                errors.append(f'[{src.split}/{src.task}] {err}')
                continue
            source = {'kind': 'aio', 'gt_dir': src.gt_dir, 'lq_dir': src.lq_dir, 'rule': src.rule}
            plan.append((src.split, src.task, items, source))
        if errors:
            raise PackError('\n'.join(errors))
        return args.paths[1], plan
    if args.layout == 'paired':
        if len(args.paths) != 3:
            raise PackError('--layout paired takes LQ GT OUT (LQ "-" with --clean-only)')
        if not args.task:
            raise PackError('--layout paired needs --task (denoise, derain, dehaze, deblur or lowlight)')
        task = check_task(args.task, '--task')
        lq, gt, out = args.paths
        if args.clean_only:
            items = clean_items(gt)
        else:
            items = pair_folders(lq, gt, args.match, task, args.allow_unpaired)
        source = {'kind': 'paired', 'gt_dir': gt, 'lq_dir': None if args.clean_only else lq, 'rule': args.match}
        return out, [(args.split, task, items, source)]
    raise PackError(f'unknown layout {args.layout!r}')


def _table(rows):
    head = '| split | task | records | added | skipped | format |\n|---|---|---:|---:|---:|---|\n'
    return head + ''.join(f"| {r['split']} | {r['task']} | {r['count']} | {r['added']} | {r['skipped']} | "
                          f"{r['format']} |\n" for r in rows)


def run(args):
    """Entry point of ``perceive-ir pack``; returns the exit code (0 ok, 2 bad input)."""
    from perceive_ir_plugin.data.packing import write_task_pack
    from perceive_ir_plugin.data.tasks import TASKS, check_task
    map_size = int(args.map_size_gb * 1024**3) if args.map_size_gb else None
    try:
        if args.layout == 'demo':
            from perceive_ir_plugin.data.demo_data import make_demo_packs
            if len(args.paths) != 1:
                raise PackError('--layout demo takes OUT')
            tasks = [check_task(t, '--tasks') for t in args.tasks] if args.tasks else TASKS
            out = args.paths[0]
            results = make_demo_packs(out, tasks=tasks, splits=args.splits, max_side=args.max_side,
                                      fmt=args.format, seed=args.seed, progress=not args.no_progress)
            rows = list(results.values())
            print('Demo packs are stand-ins made from scikit-image photographs with synthetic degradations; '
                  'they are not the benchmark data sets.')
        else:
            out, plan = _plan(args)
            rows = [write_task_pack(out, split, task, items, fmt=args.format, compress_level=args.compress_level,
                                    source=source, progress=not args.no_progress, map_size=map_size)
                    for split, task, items, source in plan]
    except (PackError, FileNotFoundError, ValueError) as err:
        print(f'perceive-ir pack: error: {err}', file=sys.stderr)
        return 2
    print(f'Packed into {out}:')
    print(_table(rows))
    return 0
