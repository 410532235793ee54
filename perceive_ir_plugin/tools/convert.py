"""``perceive-ir convert``: turn any supported checkpoint into a BasicSR ``{'params': ...}`` file.

Example (PromptIR's Lightning release)::

    perceive-ir convert ckpt/model.ckpt experiments/pretrained_models/PromptIR.pth \\
        --arch PromptIR --arch-opt decoder=true

The output loads with stock BasicSR (``path.pretrain_network_g`` + ``strict_load_g:
true``). The input is read with ``weights_only=True``; a file that carries pickled
Python objects is refused unless ``--trust-checkpoint`` is given.
"""
import os
import sys

import yaml


def parse_arch_options(items):
    """Parse ``key=value`` strings; values are YAML scalars/lists (``true``, ``48``, ``[4,6,6,8]``).

    Args:
        items (list[str] | None): The ``--arch-opt`` values.

    Returns:
        dict: Constructor keyword arguments.

    Raises:
        ValueError: An item without ``=``.
    """
    options = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise ValueError(f"--arch-opt expects key=value, got '{item}'.")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return options


def convert_checkpoint(src, dst, arch, arch_options=None, param_key=None, trust=False, overwrite=False):
    """Load ``src`` into a freshly built ``arch`` strictly and save ``{'params': state_dict}`` to ``dst``.

    Args:
        src (str): Input checkpoint (BasicSR, Lightning, DDP or plain state dict).
        dst (str): Output ``.pth`` (written atomically).
        arch (str): Registered architecture type, e.g. ``PromptIR``.
        arch_options (dict, optional): Constructor arguments of ``arch``.
        param_key (str, optional): Top-level key of ``src`` (default: detected).
        trust (bool): Allow pickled objects in ``src`` (runs code when unpickled!).
        overwrite (bool): Replace an existing ``dst``.

    Returns:
        dict: Summary with ``arch``, ``num_tensors``, ``num_params``, ``source`` and ``prefix``.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        CheckpointError: Unsafe file, no state dict, or keys/shapes that do not fit ``arch``.
    """
    import perceive_ir_plugin  # noqa: F401  (registers the archs)
    from basicsr.archs import build_network
    from basicsr.utils.registry import ARCH_REGISTRY

    from perceive_ir_plugin.utils.atomic_io import atomic_torch_save
    from perceive_ir_plugin.utils.checkpoint import (CheckpointError, compare_state_dicts, extract_state_dict,
                                                     format_mismatch, load_checkpoint_file, strip_prefix)

    if os.path.abspath(src) == os.path.abspath(dst):
        raise FileExistsError(f"Output '{dst}' is the input file; write the conversion to a new file.")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"Output '{dst}' exists; pass --overwrite to replace it.")
    if arch not in ARCH_REGISTRY:
        raise CheckpointError(f"Unknown --arch '{arch}'; registered architectures: {sorted(ARCH_REGISTRY.keys())}.")
    net = build_network({'type': arch, **(arch_options or {})})
    checkpoint = load_checkpoint_file(src, trust=trust, option_key=None)
    state_dict, source = extract_state_dict(checkpoint, param_key)
    state_dict, prefix = strip_prefix(state_dict, net.state_dict().keys())
    report = compare_state_dicts(net.state_dict(), state_dict)
    if any(report.values()):
        raise CheckpointError(f"Checkpoint '{src}' ({source}) does not fit {arch}"
                              f'({", ".join(f"{k}={v!r}" for k, v in (arch_options or {}).items())}):\n'
                              f'{format_mismatch(report)}\nCheck --arch and --arch-opt (e.g. decoder=true for '
                              "PromptIR's release, LayerNorm_type=BiasFree for Restormer's denoisers).")
    net.load_state_dict(state_dict, strict=True)
    params = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    out_dir = os.path.dirname(os.path.abspath(dst))
    os.makedirs(out_dir, exist_ok=True)
    atomic_torch_save({'params': params}, dst)
    return {'arch': arch, 'num_tensors': len(params), 'num_params': sum(v.numel() for v in params.values()),
            'source': source, 'prefix': prefix}


def run(args):
    """Entry of ``perceive-ir convert``; returns the exit code."""
    from perceive_ir_plugin.utils.checkpoint import CheckpointError
    try:
        arch, arch_options = args.arch, {}
        if args.opt:
            with open(args.opt, encoding='utf-8') as f:
                network_opt = dict((yaml.safe_load(f) or {}).get('network_g') or {})
            if 'type' not in network_opt:
                raise ValueError(f"Option file '{args.opt}' has no network_g.type.")
            arch = arch or network_opt.pop('type')
            network_opt.pop('type', None)
            arch_options.update(network_opt)
        if not arch:
            raise ValueError('Give --arch TYPE (or --opt with a network_g section).')
        arch_options.update(parse_arch_options(args.arch_opt))
        summary = convert_checkpoint(args.input, args.output, arch, arch_options, param_key=args.param_key,
                                     trust=args.trust_checkpoint, overwrite=args.overwrite)
    except (CheckpointError, OSError, ValueError, TypeError, yaml.YAMLError) as err:
        print(f'perceive-ir convert: error: {err}', file=sys.stderr)
        return 1
    prefix = f", stripped prefix '{summary['prefix']}'" if summary['prefix'] else ''
    print(f"Wrote {args.output}: {summary['arch']}, {summary['num_tensors']} tensors, "
          f"{summary['num_params']:,} values, from {summary['source']}{prefix}. Load it with "
          'path.pretrain_network_g (param_key_g: params, strict_load_g: true).')
    return 0


def add_parser(subparsers):
    """Add the ``convert`` sub-command."""
    parser = subparsers.add_parser(
        'convert', help='convert a BasicSR/Lightning/DDP/plain checkpoint to a BasicSR {params: ...} file',
        description='Load IN strictly into a freshly built --arch network (weights_only=True) and write '
        "OUT = {'params': state_dict}, loadable by BasicSR's pretrain_network_g with strict_load_g: true.")
    parser.add_argument('input', metavar='IN', help='input checkpoint (.pth, .ckpt, ...)')
    parser.add_argument('output', metavar='OUT', help='output .pth')
    parser.add_argument('--arch', metavar='TYPE', help='registered arch type, e.g. PromptIR')
    parser.add_argument('--opt', metavar='YML', help='take the arch type and options from network_g of this option '
                        'file (--arch/--arch-opt override it)')
    parser.add_argument('--arch-opt', dest='arch_opt', nargs='+', action='extend', metavar='KEY=VALUE',
                        help='constructor argument(s) of the arch, YAML values (decoder=true, num_blocks=[4,6,6,8])')
    parser.add_argument('--param-key', dest='param_key', default=None,
                        help='top-level key holding the weights (default: detected: params, params_ema, '
                        'state_dict, ...)')
    parser.add_argument('--trust-checkpoint', dest='trust_checkpoint', action='store_true',
                        help='allow pickled Python objects in IN (they can run code: only for files you trust)')
    parser.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    parser.set_defaults(func=run)
