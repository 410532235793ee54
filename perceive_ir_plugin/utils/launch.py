"""Run BasicSR 1.4.2's ``train_pipeline`` / ``test_pipeline`` with its launch-time quirks fixed.

Nothing here changes BasicSR at import time. :func:`run_pipeline` patches two BasicSR
functions only while a pipeline runs and restores them afterwards:

* ``basicsr.utils.options.init_dist``: 1.4.2 always uses NCCL and
  ``torch.cuda.set_device``; the replacement uses NCCL on CUDA machines and **gloo on
  CPU**, and takes the GPU from ``LOCAL_RANK`` (set by ``torchrun``);
* ``basicsr.train.load_resume_state``: 1.4.2 maps the state onto
  ``torch.cuda.current_device()`` (fails without CUDA) and looks for ``--auto_resume``
  states relative to the current directory. The replacement loads onto the CPU with
  ``weights_only=True`` and looks in ``<root>/experiments/<name>/training_states``.

It also drops the ``--local-rank=N`` / ``--local_rank N`` argument that
``python -m torch.distributed.launch`` adds on torch >= 2.0 (``torchrun`` passes the rank
through the environment instead), and applies ``--force_yml a:b=value`` itself: BasicSR
1.4.2 builds Python source from the command line and runs it with ``exec`` (``eval`` for
lists); here values are parsed with ``yaml.safe_load`` and written into the loaded options
before BasicSR derives anything from them. As in BasicSR, only existing keys can be set; an
unknown key is an error that suggests the closest one.

``root_path`` is the current working directory: ``experiments/``, ``results/`` and
``tb_logger/`` are created there, as with ``python basicsr/train.py`` run from a BasicSR
checkout.
"""
import difflib
import os
import re
import sys
from contextlib import contextmanager
from os import path as osp

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

_LOCAL_RANK_RE = re.compile(r'^--local[-_]rank(=.*)?$')


def strip_local_rank(argv):
    """Remove ``--local-rank=N``, ``--local_rank=N`` and ``--local-rank N`` from ``argv``.

    The value is exported as ``LOCAL_RANK`` when the environment does not have it yet.

    Args:
        argv (list[str]): Arguments without the program name.

    Returns:
        list[str]: The remaining arguments.
    """
    out, i = [], 0
    while i < len(argv):
        match = _LOCAL_RANK_RE.match(argv[i])
        if match:
            if match.group(1):
                value = match.group(1)[1:]
                i += 1
            else:
                value = argv[i + 1] if i + 1 < len(argv) else None
                i += 2
            if value is not None and value.isdigit():
                os.environ.setdefault('LOCAL_RANK', value)
            continue
        out.append(argv[i])
        i += 1
    return out


def init_dist(launcher, backend=None, **kwargs):
    """Initialise ``torch.distributed`` for ``--launcher pytorch|slurm``.

    Args:
        launcher (str): ``'pytorch'`` (torchrun: env ``RANK``, ``WORLD_SIZE``,
            ``MASTER_ADDR``/``PORT``, ``LOCAL_RANK``) or ``'slurm'``.
        backend (str, optional): Process-group backend; default NCCL with CUDA, gloo
            without.
        **kwargs: ``port`` for Slurm (``dist_params``).
    """
    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method('spawn')
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    backend = backend or ('nccl' if use_cuda else 'gloo')
    if launcher == 'pytorch':
        if use_cuda:
            local_rank = int(os.environ.get('LOCAL_RANK', int(os.environ['RANK']) % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    elif launcher == 'slurm':
        if not use_cuda:
            raise RuntimeError('--launcher slurm needs CUDA; on CPU start the ranks with torchrun '
                               '--nproc_per_node=N ... --launcher pytorch.')
        from basicsr.utils.dist_util import _init_dist_slurm
        _init_dist_slurm(backend, **kwargs)
    else:
        raise ValueError(f'Invalid launcher type: {launcher}')


def load_resume_state(opt):
    """Find and load the training state to resume from (CPU-safe, root-relative).

    With ``--auto_resume`` the newest ``<iter>.state`` in
    ``opt['path']['training_states']`` is used (none: start afresh); otherwise
    ``path.resume_state``. The state is loaded with ``weights_only=True`` onto the CPU
    (optimizers move their state to the parameters' device when loaded) and BasicSR's
    ``check_resume`` points ``pretrain_network_*`` at the matching network files.

    Returns:
        dict | None: The training state.
    """
    from basicsr.utils import check_resume, scandir
    from perceive_ir_plugin.utils.checkpoint import load_checkpoint_file

    resume_path = None
    if opt['auto_resume']:
        state_dir = opt['path'].get('training_states') or osp.join(opt['root_path'], 'experiments', opt['name'],
                                                                     'training_states')
        if osp.isdir(state_dir):
            iters = []
            for name in scandir(state_dir, suffix='.state', recursive=False, full_path=False):
                stem = name[:-len('.state')]
                if stem.isdigit():
                    iters.append(int(stem))
            if iters:
                resume_path = osp.join(state_dir, f'{max(iters)}.state')
                opt['path']['resume_state'] = resume_path
    elif opt['path'].get('resume_state'):
        resume_path = opt['path']['resume_state']
    if resume_path is None:
        return None
    state = load_checkpoint_file(resume_path, trust=bool(opt.get('trust_checkpoint', False)),
                                 option_key='path.resume_state')
    if not isinstance(state, dict) or 'iter' not in state:
        from perceive_ir_plugin.utils.checkpoint import CheckpointError
        raise CheckpointError(f"'{resume_path}' (option 'path.resume_state') is not a BasicSR training state "
                              '(no iter entry).')
    check_resume(opt, state['iter'])
    return state


def split_force_yml(argv):
    """Take the ``--force_yml KEY=VALUE ...`` entries out of ``argv``.

    Returns:
        tuple[list[str], list[str]]: Remaining arguments and the override entries.
    """
    rest, entries, i = [], [], 0
    while i < len(argv):
        if argv[i] in ('--force_yml', '--force-yml'):
            i += 1
            while i < len(argv) and not argv[i].startswith('-'):
                entries.append(argv[i])
                i += 1
            continue
        rest.append(argv[i])
        i += 1
    return rest, entries


def apply_overrides(opt, entries):
    """Set ``a:b:c=value`` entries in ``opt`` (existing keys only; YAML-parsed values, no ``eval``).

    Raises:
        KeyError: A key that does not exist (the message suggests the closest one).
        ValueError: An entry without ``=``.
    """
    for entry in entries:
        keys, sep, value = entry.partition('=')
        if not sep:
            raise ValueError(f"--force_yml expects key1:key2=value, got '{entry}'.")
        node, path = opt, []
        parts = [k.strip() for k in keys.split(':')]
        for depth, key in enumerate(parts):
            if not isinstance(node, dict) or key not in node:
                choices = list(node) if isinstance(node, dict) else []
                close = difflib.get_close_matches(key, choices, n=1)
                hint = f"; did you mean '{':'.join(path + close)}'?" if close else ''
                raise KeyError(f"--force_yml: option '{':'.join(path + [key])}' does not exist{hint}")
            path.append(key)
            if depth == len(parts) - 1:
                node[key] = yaml.safe_load(value.strip()) if value.strip() else None
            else:
                node = node[key]
    return opt


def _loader_with_overrides(base_loader, entries):
    class OverridingLoader(base_loader):
        def get_single_data(self):
            return apply_overrides(super().get_single_data(), entries)

    return OverridingLoader


@contextmanager
def patched_basicsr(force_yml=()):
    """Temporarily replace BasicSR's ``init_dist`` and ``load_resume_state``, and apply ``force_yml``."""
    import basicsr.train
    import basicsr.utils.options
    saved = (basicsr.utils.options.init_dist, basicsr.train.load_resume_state, basicsr.utils.options.ordered_yaml)
    original_ordered_yaml = basicsr.utils.options.ordered_yaml

    def ordered_yaml():
        loader, dumper = original_ordered_yaml()
        return _loader_with_overrides(loader, list(force_yml)), dumper

    basicsr.utils.options.init_dist = init_dist
    basicsr.train.load_resume_state = load_resume_state
    if force_yml:
        basicsr.utils.options.ordered_yaml = ordered_yaml
    try:
        yield
    finally:
        (basicsr.utils.options.init_dist, basicsr.train.load_resume_state,
         basicsr.utils.options.ordered_yaml) = saved


@contextmanager
def _argv(prog, args):
    saved = sys.argv
    sys.argv = [prog] + list(args)
    try:
        yield
    finally:
        sys.argv = saved


def run_pipeline(kind, argv=None, root_path=None):
    """Register the plugin and run BasicSR's train or test pipeline.

    Args:
        kind (str): ``'train'`` or ``'test'``.
        argv (list[str], optional): BasicSR arguments (``-opt X.yml [--launcher pytorch]
            [--auto_resume] [--debug] [--force_yml k=v ...]``); default ``sys.argv[1:]``.
        root_path (str, optional): Where ``experiments/`` and ``results/`` go; default the
            current working directory.

    Returns:
        int: 0 on success (errors propagate as exceptions).
    """
    import perceive_ir_plugin  # noqa: F401  (registers the plugin's classes)
    from basicsr.test import test_pipeline
    from basicsr.train import train_pipeline

    args, force_yml = split_force_yml(strip_local_rank(list(sys.argv[1:] if argv is None else argv)))
    root_path = osp.abspath(root_path or os.getcwd())
    pipeline = train_pipeline if kind == 'train' else test_pipeline
    try:
        with patched_basicsr(force_yml), _argv(f'perceive_ir_plugin.{kind}', args):
            pipeline(root_path)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
