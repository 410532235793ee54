"""The frozen CLIP behind the quality perceiver: building it with open_clip and reading its weights.

Nothing here runs at import time. The plugin's own open_clip model configs (the tiny
random ``perceive-ir-tiny-clip`` used by the tests) are registered with open_clip the
first time a model is built.

Weights are always read from a local file (option ``clip_weights``); nothing is ever
downloaded. Two kinds of files are accepted:

* ordinary ``torch.save`` files holding an open_clip or OpenAI-layout state dict (plain,
  or inside ``state_dict``/``model``/... with or without a DDP ``module.`` prefix). They
  are read by :func:`perceive_ir_plugin.utils.checkpoint.load_checkpoint_file`, i.e.
  with ``weights_only=True``.
* OpenAI's released ``ViT-B-32.pt``, which is a **TorchScript archive** (a zip holding
  ``code/`` with TorchScript source, ``data.pkl`` describing the module tree and
  ``data/<n>`` raw tensor storages). ``torch.load(weights_only=True)`` refuses such
  archives and ``torch.jit.load`` compiles and keeps the archive's code, which we do not
  want to trust. :func:`read_torchscript_tensors` therefore reads only ``data.pkl`` with
  a restricted unpickler: classes named ``__torch__.*`` become inert placeholders that
  just record their attribute dict, tensors are rebuilt from the raw storage records
  with :meth:`torch.Tensor.as_strided`, and any other global (the only thing that could
  make unpickling run code) is refused. The archive's ``code/`` is never read.
"""
import collections
import logging
import os
import pickle
import zipfile
from contextlib import contextmanager

import torch

from perceive_ir_plugin.utils.checkpoint import (CheckpointError, compare_state_dicts, extract_state_dict,
                                                 format_mismatch, load_checkpoint_file, strip_prefix)

TINY_CLIP_MODEL = 'perceive-ir-tiny-clip'
PLUGIN_CLIP_MODELS = (TINY_CLIP_MODEL, )
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

# OpenAI CLIP pre-processing constants (RGB).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Non-weight entries of OpenAI's archive.
_OPENAI_EXTRA_KEYS = ('input_resolution', 'context_length', 'vocab_size')

_STORAGE_DTYPES = {
    'FloatStorage': torch.float32,
    'HalfStorage': torch.float16,
    'BFloat16Storage': torch.bfloat16,
    'DoubleStorage': torch.float64,
    'LongStorage': torch.int64,
    'IntStorage': torch.int32,
    'ShortStorage': torch.int16,
    'CharStorage': torch.int8,
    'ByteStorage': torch.uint8,
    'BoolStorage': torch.bool,
}


def register_plugin_clip_configs():
    """Add the plugin's open_clip model configs (``configs/<name>.json``) to open_clip once."""
    import open_clip
    known = set(open_clip.list_models())
    for name in PLUGIN_CLIP_MODELS:
        if name not in known:
            open_clip.add_model_config(os.path.join(CONFIG_DIR, f'{name}.json'))


# ----------------------------------------------------------------------------------------------
# TorchScript archives (OpenAI's ViT-B-32.pt)
# ----------------------------------------------------------------------------------------------
class _ScriptObject:
    """Inert stand-in for a pickled ``__torch__.*`` object: keeps its state, nothing else."""

    type_name = '__torch__'
    state = None

    def __setstate__(self, state):
        self.state = state


class _StorageType:

    def __init__(self, name, dtype):
        self.name = name
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def _identity_list(values):
    return list(values)


def _restore_type_tag(value, type_str):
    return value


# The only callables the restricted unpickler hands out. All of them build data.
_SAFE_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch.jit._pickle', 'build_intlist'): _identity_list,
    ('torch.jit._pickle', 'build_doublelist'): _identity_list,
    ('torch.jit._pickle', 'build_boollist'): _identity_list,
    ('torch.jit._pickle', 'build_tensorlist'): _identity_list,
    ('torch.jit._pickle', 'build_genericlist'): _identity_list,
    ('torch.jit._pickle', 'restore_type_tag'): _restore_type_tag,
}


class _TorchScriptDataUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's ``data.pkl`` without executing anything."""

    def __init__(self, file, archive, prefix, path):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages = {}

    def find_class(self, module, name):
        if module == '__torch__' or module.startswith('__torch__.'):
            return type(name, (_ScriptObject, ), {'type_name': f'{module}.{name}'})
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"'{self._path}' refers to '{module}.{name}', which is not allowed in "
                                     'a weights-only read of a TorchScript archive.')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"'{self._path}': unsupported persistent id {pid!r}.")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            record = f'{self._prefix}data/{key}'
            try:
                raw = self._archive.read(record)
            except KeyError as err:
                raise pickle.UnpicklingError(f"'{self._path}' has no storage record '{record}'.") from err
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            if len(raw) < numel * itemsize:
                raise pickle.UnpicklingError(f"'{self._path}': storage record '{record}' holds {len(raw)} bytes, "
                                             f'expected {numel * itemsize} ({numel} x {storage_type.name}).')
            flat = torch.frombuffer(bytearray(raw[:numel * itemsize]), dtype=storage_type.dtype) if numel else \
                torch.empty(0, dtype=storage_type.dtype)
            self._storages[key] = flat
        return self._storages[key]


def _torchscript_prefix(archive):
    """Return the record prefix (``'<folder>/'``) of a TorchScript archive, or None."""
    names = archive.namelist()
    for name in names:
        if name.endswith('data.pkl'):
            prefix = name[:-len('data.pkl')]
            if any(n.startswith(prefix + 'code/') or n == prefix + 'constants.pkl' for n in names):
                return prefix
    return None


def is_torchscript_archive(path):
    """True when ``path`` is a TorchScript zip archive (``torch.jit.save`` output)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return _torchscript_prefix(archive) is not None


def _collect_tensors(obj, prefix, out, seen):
    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = obj.state
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[f'{prefix}{name}'] = value
        elif isinstance(value, _ScriptObject):
            _collect_tensors(value, f'{prefix}{name}.', out, seen)


def read_torchscript_tensors(path, option_key=None):
    """Read every tensor attribute of a TorchScript module archive, without running its code.

    Args:
        path (str): A ``torch.jit.save`` archive, e.g. OpenAI's ``ViT-B-32.pt``.
        option_key (str, optional): Option that named the file, quoted in errors.

    Returns:
        dict[str, Tensor]: Dotted attribute names (as ``module.state_dict()`` would name
        them, plus non-persistent buffers) → tensors, in the archive's dtype.

    Raises:
        CheckpointError: The archive is malformed or refers to anything but plain data.
    """
    where = f"'{path}'" + (f" (option '{option_key}')" if option_key else '')
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _torchscript_prefix(archive)
            if prefix is None:
                raise CheckpointError(f'{where} is not a TorchScript archive.')
            byteorder = f'{prefix}byteorder'
            if byteorder in archive.namelist() and archive.read(byteorder).strip() not in (b'', b'little'):
                raise CheckpointError(f'{where} stores big-endian tensors, which are not supported.')
            with archive.open(f'{prefix}data.pkl') as f:
                root = _TorchScriptDataUnpickler(f, archive, prefix, path).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f'Cannot read the TorchScript archive {where}: {err}') from err
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f'{where}: the TorchScript archive does not hold a module.')
    tensors = {}
    _collect_tensors(root, '', tensors, set())
    return tensors


# ----------------------------------------------------------------------------------------------
# Building the frozen CLIP
# ----------------------------------------------------------------------------------------------
class _DropRecords(logging.Filter):

    def __init__(self, startswith):
        super().__init__()
        self.startswith = startswith

    def filter(self, record):
        return not str(record.getMessage()).startswith(self.startswith)


@contextmanager
def _quiet_open_clip_random_init():
    """Hide open_clip's "No pretrained weights loaded" warning: weights are loaded right after."""
    flt = _DropRecords('No pretrained weights loaded')
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def read_clip_state_dict(path, option_key='clip_weights'):
    """Read CLIP weights from a local file of any accepted kind (see the module docstring).

    Returns:
        tuple[dict[str, Tensor], str]: The raw state dict and a description of the source
        (``'TorchScript archive'`` or where in the checkpoint it was found).
    """
    if is_torchscript_archive(path):
        return read_torchscript_tensors(path, option_key=option_key), 'TorchScript archive'
    try:
        checkpoint = load_checkpoint_file(path, option_key=option_key)
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 -- torch.load fails in many ways on non-checkpoint files
        raise CheckpointError(f"Cannot read CLIP weights '{path}' (option '{option_key}'): not a PyTorch "
                              f'checkpoint ({type(err).__name__}: {err}).') from err
    return extract_state_dict(checkpoint)


def load_clip_weights(model, path, model_name, option_key='clip_weights'):
    """Load a CLIP weights file into an open_clip model built from ``model_name``'s config.

    Args:
        model (nn.Module): open_clip ``CLIP``/``CustomTextCLIP`` (random init).
        path (str): Local weights file.
        model_name (str): Its open_clip config name (for messages).
        option_key (str): Option that named the file (for messages).

    Returns:
        str: Description of the source format.

    Raises:
        CheckpointError: Unreadable file, or weights that do not fit the config
            (missing/unexpected keys or shape differences are listed).
    """
    state_dict, source = read_clip_state_dict(path, option_key=option_key)
    target = model.state_dict()
    if hasattr(model, 'text') and 'positional_embedding' in state_dict and 'text.positional_embedding' in target:
        from open_clip.model import convert_to_custom_text_state_dict
        state_dict = convert_to_custom_text_state_dict(state_dict)
    state_dict, _ = strip_prefix(state_dict, target.keys())
    non_persistent = {name for name, _ in model.named_buffers()} - set(target)
    state_dict = {k: v for k, v in state_dict.items() if k not in _OPENAI_EXTRA_KEYS and k not in non_persistent}
    for key in ('logit_scale', 'logit_bias'):
        if key in state_dict and key in target and state_dict[key].numel() == target[key].numel():
            state_dict[key] = state_dict[key].reshape(target[key].shape)
    report = compare_state_dicts(target, state_dict)
    if any(report.values()):
        raise CheckpointError(
            f"CLIP weights '{path}' (option '{option_key}', read as {source}) do not fit the open_clip model "
            f"'{model_name}' (option 'clip_model'):\n{format_mismatch(report)}\n"
            'Give the weights of that exact CLIP architecture, or change clip_model to match the file.')
    model.load_state_dict({k: v.to(dtype=target[k].dtype) for k, v in state_dict.items()}, strict=True)
    return source


def build_frozen_clip(model_name, weights=None, option_key='clip_weights', model_option_key='clip_model'):
    """Build an open_clip model from its config, load local weights, freeze it (fp32, eval).

    Args:
        model_name (str): open_clip config name, e.g. ``'ViT-B-32-quickgelu'`` or the
            plugin's ``'perceive-ir-tiny-clip'``.
        weights (str, optional): Local weights file. Required for every model except the
            tiny test config, which is then initialised randomly with a fixed seed (0), so
            every instance is the same network.
        option_key (str): Option holding ``weights``, quoted in errors.
        model_option_key (str): Option holding ``model_name``, quoted in errors.

    Returns:
        nn.Module: The frozen open_clip model (all ``requires_grad`` False, eval mode).

    Raises:
        ValueError: Unknown config name.
        FileNotFoundError: No weights file given, or the file does not exist.
        CheckpointError: The file cannot be read or does not fit the config.
    """
    import open_clip
    register_plugin_clip_configs()
    if model_name not in open_clip.list_models():
        examples = ', '.join(['ViT-B-32-quickgelu', 'ViT-B-32', 'ViT-B-16', TINY_CLIP_MODEL])
        raise ValueError(f"Option '{model_option_key}': '{model_name}' is not an open_clip model config "
                         f'(examples: {examples}; see open_clip.list_models()).')
    if weights is None and model_name != TINY_CLIP_MODEL:
        expected = "OpenAI's ViT-B-32.pt" if model_name.startswith('ViT-B-32') else 'CLIP checkpoint'
        raise FileNotFoundError(
            f"Option '{option_key}' is not set: the quality perceiver needs local weights for the CLIP model "
            f"'{model_name}' (e.g. {expected}, or an open_clip state dict of '{model_name}'). Nothing is downloaded.")
    if weights is not None and not os.path.isfile(str(weights)):
        raise FileNotFoundError(f"CLIP weights file not found: '{weights}' (option '{option_key}'). Expected a local "
                                f"copy of the weights of '{model_name}' (OpenAI's ViT-B-32.pt or an open_clip "
                                'state dict).')
    with torch.random.fork_rng(devices=[]), _quiet_open_clip_random_init():
        torch.manual_seed(0)
        model = open_clip.create_model(model_name, pretrained=None, device='cpu', precision='fp32')
    if not hasattr(model, 'encode_image') or not hasattr(model, 'logit_scale'):
        raise ValueError(f"Option '{model_option_key}': '{model_name}' is not a contrastive CLIP model.")
    if weights is not None:
        source = load_clip_weights(model, weights, model_name, option_key=option_key)
        cfg = open_clip.get_model_config(model_name) or {}
        if source == 'TorchScript archive' and not cfg.get('quick_gelu', False):
            from basicsr.utils import get_root_logger
            get_root_logger().warning(
                f"Loaded OpenAI's TorchScript CLIP weights into '{model_name}', whose config uses GELU; OpenAI "
                "models were trained with QuickGELU (use 'ViT-B-32-quickgelu' or another '-quickgelu' config).")
    model = model.float().eval()
    model.requires_grad_(False)
    return model
