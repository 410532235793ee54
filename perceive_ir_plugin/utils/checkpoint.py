"""Safe loading of checkpoints from BasicSR, PyTorch Lightning, DDP and plain PyTorch.

Every weight file the plugin reads goes through :func:`load_checkpoint_file`, which
always calls ``torch.load(..., weights_only=True)``. A file whose extras need more
than that (pickled classes or code) is refused unless the caller opts in with
``trust=True`` (the ``--trust-checkpoint`` flag / ``trust_checkpoint`` option), which
is logged as a warning every time.

Supported layouts (detected automatically):

* BasicSR: ``{'params': sd}`` and/or ``{'params_ema': sd}``;
* PyTorch Lightning: ``{'state_dict': {'net.<key>': ...}, 'epoch': ..., ...}``
  (PromptIR's release);
* the Perceive-IR release: ``{'model': sd, 'iteration': ...}``;
* DDP / DataParallel ``module.`` prefixes, and plain state dicts.
"""
import os
import pickle

import torch

from basicsr.utils import get_root_logger

# Top-level keys that hold a state dict, in the order they are tried.
STATE_DICT_KEYS = ('params', 'params_ema', 'state_dict', 'model', 'net', 'net_g', 'network', 'weights')
# Prefixes stripped from every key when that makes the keys match the network.
KNOWN_PREFIXES = ('', 'module.', 'net.', 'net.module.', 'model.', 'net_g.', '_orig_mod.', 'module.net.')


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, or does not fit the network it is loaded into."""


def _where(path, option_key):
    return f"'{path}'" + (f" (option '{option_key}')" if option_key else '')


def load_checkpoint_file(path, *, trust=False, option_key=None, map_location='cpu'):
    """Read a checkpoint file with ``weights_only=True``.

    Args:
        path (str): File to read.
        trust (bool): Allow a full unpickling (arbitrary code!) if the safe load fails.
        option_key (str, optional): The option that named the file, quoted in errors.
        map_location: Passed to ``torch.load``.

    Returns:
        object: What the file holds (usually a dict).

    Raises:
        FileNotFoundError: The file does not exist (message names the option key).
        CheckpointError: The file needs more than ``weights_only`` and ``trust`` is False,
            or it is not a PyTorch file at all.
    """
    if path is None or not os.path.isfile(str(path)):
        raise FileNotFoundError(f'Checkpoint file not found: {_where(path, option_key)}. '
                                'Give the path of an existing .pth/.ckpt file.')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _asks_for_globals(err):
            raise CheckpointError(f'Cannot read {_where(path, option_key)} as a PyTorch checkpoint '
                                  f'(corrupt, truncated or another format): {_first_line(err)}') from err
        if not trust:
            raise CheckpointError(
                f'Refusing to load {_where(path, option_key)}: it contains pickled Python objects that '
                "torch.load(weights_only=True) will not build, and unpickling them can run arbitrary code. "
                'If you trust where this file comes from, pass --trust-checkpoint (command line) or set '
                f'trust_checkpoint: true (options) to load it anyway. Details: {_first_line(err)}') from err
        get_root_logger().warning(f'Loading {_where(path, option_key)} with weights_only=False because '
                                  'trust was given explicitly: this file can run code when unpickled.')
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise CheckpointError(f'Cannot read {_where(path, option_key)} as a PyTorch checkpoint '
                              f'(corrupt, truncated or another format): {_first_line(err)}') from err


def _asks_for_globals(err):
    """True when the safe unpickler stopped at a class/function reference (not at garbage bytes)."""
    text = str(err)
    return 'global' in text.lower() and 'Unsupported operand' not in text


def _first_line(err):
    lines = [line for line in str(err).splitlines() if line.strip()]
    wanted = [line for line in lines if 'global' in line.lower() or 'operand' in line.lower()]
    return (wanted or lines or [type(err).__name__])[0].strip()[:300]


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(checkpoint, param_key=None):
    """Find the state dict inside a loaded checkpoint.

    Args:
        checkpoint (dict): What :func:`load_checkpoint_file` returned.
        param_key (str, optional): Top-level key to use (``params``, ``params_ema``,
            ``state_dict``...). ``None`` detects it.

    Returns:
        tuple[dict, str]: The state dict and a description of where it was found.

    Raises:
        CheckpointError: No state dict could be found, or ``param_key`` is absent.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'Checkpoint holds a {type(checkpoint).__name__}, not a dict of tensors.')
    if param_key is not None:
        if param_key not in checkpoint:
            raise CheckpointError(f"Checkpoint has no top-level key '{param_key}'; its keys are "
                                  f'{sorted(map(str, checkpoint))[:10]}.')
        if not _is_state_dict(checkpoint[param_key]):
            raise CheckpointError(f"Checkpoint entry '{param_key}' is not a state dict of tensors.")
        return checkpoint[param_key], f"key '{param_key}'"
    if _is_state_dict(checkpoint):
        return checkpoint, 'plain state dict'
    for key in STATE_DICT_KEYS:
        if key in checkpoint and _is_state_dict(checkpoint[key]):
            return checkpoint[key], f"key '{key}'"
    raise CheckpointError('No state dict found in checkpoint: expected a plain state dict or one of the '
                          f'top-level keys {list(STATE_DICT_KEYS)}; found {sorted(map(str, checkpoint))[:10]}.')


def strip_prefix(state_dict, target_keys):
    """Strip the known prefix that makes ``state_dict`` match ``target_keys`` best.

    Keys that do not carry the chosen prefix (for example a Lightning module's loss
    buffers beside its ``net.`` weights) are dropped.

    Args:
        state_dict (dict[str, Tensor]): Loaded weights.
        target_keys (Iterable[str]): Keys of the network's own state dict.

    Returns:
        tuple[dict, str]: The re-keyed state dict and the prefix that was stripped.
    """
    target = set(target_keys)
    best, best_hits = '', -1
    for prefix in KNOWN_PREFIXES:
        hits = sum(1 for k in state_dict if k.startswith(prefix) and k[len(prefix):] in target)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if not best:
        return dict(state_dict), ''
    return {k[len(best):]: v for k, v in state_dict.items() if k.startswith(best)}, best


def compare_state_dicts(expected, loaded):
    """Compare key sets and shapes.

    Args:
        expected (dict[str, Tensor]): The network's state dict.
        loaded (dict[str, Tensor]): The checkpoint's (prefix already stripped).

    Returns:
        dict: ``missing`` and ``unexpected`` (sorted key lists) and ``shape`` (list of
        ``(key, expected_shape, loaded_shape)``).
    """
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shape = [(k, tuple(expected[k].shape), tuple(loaded[k].shape)) for k in expected
             if k in loaded and tuple(expected[k].shape) != tuple(loaded[k].shape)]
    return {'missing': missing, 'unexpected': unexpected, 'shape': shape}


def format_mismatch(report, limit=5):
    """Describe a :func:`compare_state_dicts` report: the first ``limit`` of each kind, with counts."""
    lines = []
    for name in ('missing', 'unexpected'):
        keys = report[name]
        if keys:
            more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
            lines.append(f'{len(keys)} {name} key(s): {", ".join(keys[:limit])}{more}')
    if report['shape']:
        items = [f'{k}: network {a} vs checkpoint {b}' for k, a, b in report['shape'][:limit]]
        more = f' ... and {len(report["shape"]) - limit} more' if len(report['shape']) > limit else ''
        lines.append(f'{len(report["shape"])} shape difference(s): {"; ".join(items)}{more}')
    return '\n'.join(lines)


def load_state_dict_for(net, path, *, param_key=None, trust=False, option_key=None):
    """Read ``path`` and return the state dict re-keyed for ``net`` (nothing is loaded yet).

    Returns:
        tuple[dict, dict]: The state dict and the mismatch report against ``net``.
    """
    checkpoint = load_checkpoint_file(path, trust=trust, option_key=option_key)
    state_dict, _ = extract_state_dict(checkpoint, param_key)
    state_dict, _ = strip_prefix(state_dict, net.state_dict().keys())
    return state_dict, compare_state_dicts(net.state_dict(), state_dict)


def load_checkpoint_into(net, path, *, param_key=None, strict=True, trust=False, option_key=None):
    """Load a checkpoint of any supported layout into ``net``.

    Args:
        net (nn.Module): Target network (unwrap DDP first).
        path (str): Checkpoint file.
        param_key (str, optional): Top-level key; ``None`` detects it.
        strict (bool): Fail on any missing/unexpected key or shape difference. When
            False, matching keys are loaded and the differences are logged.
        trust (bool): See :func:`load_checkpoint_file`.
        option_key (str, optional): Option that named the file, for error messages.

    Returns:
        dict: The mismatch report (empty lists when everything matched).

    Raises:
        CheckpointError: With ``strict``, when keys or shapes differ (the message lists
            missing keys, unexpected keys and shape differences, first few of each).
    """
    state_dict, report = load_state_dict_for(net, path, param_key=param_key, trust=trust, option_key=option_key)
    if any(report.values()):
        text = format_mismatch(report)
        if strict:
            raise CheckpointError(f'Checkpoint {_where(path, option_key)} does not fit '
                                  f'{type(net).__name__}:\n{text}')
        get_root_logger().warning(f'Loading {_where(path, option_key)} non-strictly:\n{text}')
        shape_bad = {k for k, _, _ in report['shape']}
        state_dict = {k: v for k, v in state_dict.items() if k not in shape_bad}
    net.load_state_dict(state_dict, strict=strict)
    return report
