"""Validate a BasicSR option file before anything is built from it.

BasicSR 1.4.2 reads options with ``opt['key']`` / ``opt.get('key')`` wherever they are
needed, so a misspelt key (``num_blok``, ``total_iters``, ``save_checkpoint_frq``) is either
silently ignored (the default is used) or fails deep inside a constructor after minutes of
data loading. :func:`check_options` looks at the whole option dict first and reports every
problem at once, each with its full option path and, where one exists, the closest valid
spelling (``difflib``)::

    Invalid options in 'train.yml' (2 problems):
      - network_g.num_blok: Restormer takes no argument 'num_blok'; did you mean 'num_blocks'?
      - datasets.train.type: unknown dataset 'PairedImageDatset'; did you mean 'PairedImageDataset'?

What is checked, and against what:

* ``network_*``: ``type`` against ``ARCH_REGISTRY``; the other keys against the constructor
  signature of that class (``inspect``; a constructor with ``**kwargs`` accepts any key);
  required constructor arguments that are missing; values of weight-file arguments
  (``*weights``, ``*_ckpt``, ``*_checkpoint``; also in losses) that name no existing file.
* ``model_type`` against ``MODEL_REGISTRY``; ``datasets.<phase>.type`` against
  ``DATASET_REGISTRY`` (phases are ``train``, ``val``, ``test`` with optional ``_suffix``);
  ``val.metrics.<name>.type`` against ``METRIC_REGISTRY``; every ``train.*_opt`` with a
  ``type`` against ``LOSS_REGISTRY``; ``train.optim_*`` and ``train.scheduler`` against the
  optimizers/schedulers the plugin's models build. Their keys are checked against the
  class or function signatures like the networks'.
* Keys of the sections (top level, ``train``, ``val``, ``path``, ``logger``,
  ``dist_params``, each dataset): BasicSR 1.4.2's keys (table below, read from its
  ``train.py``/``test.py``/``models``/``data``), plus every key the plugin's own code reads
  from an option dict (found by scanning the package source for ``opt['key']``,
  ``opt.get('key')`` and ``'key' in opt`` on names containing ``opt``), plus keys a class
  declares in an ``option_keys`` class attribute (a dict section -> keys for models, an
  iterable of keys for datasets). Dataset keys are the data-loader keys plus those its
  class (and its base classes) reads.
* Files: ``path.pretrain_network_*`` and ``path.resume_state`` must exist, and so must each
  dataset's ``dataroot*`` / ``meta_info_file``; a disk folder must hold at least one image
  (BasicSR would otherwise fail with a division by zero); an LMDB folder needs ``meta_info.txt``
  (skipped with ``check_files=False``, e.g. for option templates with placeholder paths).
* The option file itself is read with ``yaml.safe_load``: a Python-object tag
  (``!!python/object/apply:...``), which BasicSR's own loader would execute, is refused.
"""
import argparse
import ast
import difflib
import functools
import inspect
import os
import re
import sys

import yaml

# ------------------------------------------------------------------------------ known keys
# BasicSR 1.4.2 (basicsr/train.py, test.py, utils/options.py, models/*, data/__init__.py).
BASICSR_TOP_KEYS = {
    'name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'path', 'train', 'val', 'logger',
    'dist_params', 'find_unused_parameters',
    # written by parse_options itself (accepted so that a dumped, parsed option dict validates too)
    'is_train', 'dist', 'rank', 'world_size', 'auto_resume', 'root_path',
}
BASICSR_SECTION_KEYS = {
    'train': {'total_iter', 'warmup_iter', 'ema_decay', 'scheduler', 'net_d_iters', 'net_d_init_iters',
              'net_d_reg_every', 'r1_reg_weight', 'path_reg_weight', 'net_g_reg_every', 'mixing_prob',
              'fix_flow', 'flow_lr_mul', 'gan_loss_weight', 'use_static_discriminator'},
    'val': {'val_freq', 'save_img', 'metrics', 'suffix', 'pbar', 'flip_seq', 'center_frame_only'},
    'logger': {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'},
    'path': {'resume_state', 'ignore_resume_networks', 'experiments_root', 'models', 'training_states', 'log',
             'visualization', 'results_root'},
    'dist_params': {'backend', 'port'},
}
# Key patterns that stand for a family (any network label / loss / optimizer name).
SECTION_PATTERNS = {
    'top': (r'network_\w+',),
    'train': (r'optim_\w+', r'\w+_opt'),
    'path': (r'pretrain_network_\w+', r'strict_load_\w+', r'param_key_\w+'),
}
# Keys every dataset accepts: build_dataset/build_dataloader/parse_options read them.
DATALOADER_KEYS = {'name', 'type', 'phase', 'scale', 'io_backend', 'batch_size_per_gpu', 'num_worker_per_gpu',
                   'use_shuffle', 'dataset_enlarge_ratio', 'prefetch_mode', 'pin_memory', 'persistent_workers',
                   'num_prefetch_queue'}
# Dataset-section keys read by the plugin's models rather than by the dataset class
# (Restormer's progressive-training layout, read by ImageRestorationModel).
MODEL_DATASET_KEYS = {'iters', 'mini_batch_sizes', 'gt_sizes'}
DATASET_PHASES = ('train', 'val', 'test')
SECTIONS = ('train', 'val', 'path', 'logger')
WEIGHT_ARG_RE = re.compile(r'(^|_)(weights|ckpt|checkpoint)$')
# Names that receive option dicts in the scanned source.
_OPT_NAME_RE = re.compile(r'opt', re.IGNORECASE)
PLUGIN_PACKAGE = 'perceive_ir_plugin'


class OptionError(ValueError):
    """Options that BasicSR/the plugin cannot use; the message lists every problem with its option path."""

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        where = f' in {source!r}' if source else ''
        lines = '\n'.join(f'  - {p}' for p in self.problems)
        super().__init__(f'Invalid options{where} ({len(self.problems)} problem'
                         f'{"s" if len(self.problems) != 1 else ""}):\n{lines}')


def closest(name, choices):
    """The closest spelling of ``name`` among ``choices`` (``None`` if nothing is close).

    A case-insensitive exact match wins (``l1loss`` -> ``L1Loss``); otherwise difflib's best
    match above a 0.6 ratio, compared case-insensitively.
    """
    lowered = {}
    for choice in choices:
        lowered.setdefault(str(choice).lower(), str(choice))
    key = str(name).lower()
    if key in lowered:
        return lowered[key]
    match = difflib.get_close_matches(key, list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def _hint(name, choices, prefix=''):
    match = closest(name, choices)
    return f"; did you mean '{prefix}{match}'?" if match else ''


# ------------------------------------------------------------------- reading source for keys
def _receiver_is_opt(node):
    """True when an expression reads like an option dict (``opt``, ``self.opt['train']``, ``val_opt``)."""
    try:
        text = ast.unparse(node)
    except Exception:  # noqa: BLE001 -- unparsable nodes simply do not count
        return False
    return bool(_OPT_NAME_RE.search(text))


def _string_items(node, constants):
    """The strings of a literal tuple/list (or of a module constant naming one), else an empty set."""
    if isinstance(node, ast.Name):
        return constants.get(node.id, set())
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        return items if len(items) == len(node.elts) else set()
    return set()


def _keys_read_in_source(source):
    """String keys read from option dicts in Python ``source`` (see the module docstring).

    A key may be a string literal, or a loop variable running over a literal tuple/list of
    strings (``for key in ('size_multiple', 'window_size'): val_opt.get(key)``), directly or
    through a module-level constant (``for k in PROGRESSIVE_KEYS``).
    """
    tree = ast.parse(source)
    constants, loop_vars = {}, {}
    for node in tree.body:  # module constants: NAME = ('a', 'b')
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            items = _string_items(node.value, {})
            if items:
                constants[node.targets[0].id] = items
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
            loop_vars.setdefault(node.target.id, set()).update(_string_items(node.iter, constants))

    def key_names(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.Name):
            return loop_vars.get(node.id, set())
        return set()

    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _receiver_is_opt(node.value):
            keys |= key_names(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ('get', 'setdefault', 'pop') and node.args \
                and _receiver_is_opt(node.func.value):
            keys |= key_names(node.args[0])
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)) \
                and _receiver_is_opt(node.comparators[0]):
            keys |= key_names(node.left)
    return keys


@functools.lru_cache(maxsize=None)
def _keys_read_in_file(path):
    try:
        with open(path, encoding='utf-8') as f:
            return frozenset(_keys_read_in_source(f.read()))
    except (OSError, SyntaxError, ValueError):
        return frozenset()


def plugin_option_keys():
    """Every key the plugin's source reads from an option dict (a frozenset)."""
    import perceive_ir_plugin
    root = os.path.dirname(perceive_ir_plugin.__file__)
    keys = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith('.py'):
                keys |= _keys_read_in_file(os.path.join(folder, name))
    return frozenset(keys)


def _class_option_keys(cls, section=None):
    """Keys declared in ``option_keys`` class attributes along the MRO (dict by section, or iterable)."""
    keys = set()
    for klass in inspect.getmro(cls):
        declared = klass.__dict__.get('option_keys')
        if declared is None:
            continue
        if isinstance(declared, dict):
            keys |= set(declared.get(section, ()) if section is not None else ())
        elif section is None:
            keys |= set(declared)
    return keys


def dataset_option_keys(cls):
    """Keys a dataset class accepts: data-loader keys, keys its class hierarchy reads, declared keys."""
    declared = _class_option_keys(cls)
    keys = set(DATALOADER_KEYS) | MODEL_DATASET_KEYS | declared
    for klass in inspect.getmro(cls):
        module = sys.modules.get(klass.__module__)
        path = getattr(module, '__file__', None)
        if not path or klass.__module__.startswith(('torch.', 'builtins')):
            continue
        if klass.__module__.startswith(PLUGIN_PACKAGE):
            if declared:  # plugin datasets that declare option_keys are held to them (as at run time)
                from perceive_ir_plugin.data.dataset_options import BASICSR_DATASET_KEYS
                keys |= BASICSR_DATASET_KEYS
            else:  # otherwise: any key the plugin reads (helper modules)
                keys |= plugin_option_keys()
        else:
            keys |= _keys_read_in_file(path)
    return keys


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.ppm', '.webp')


def _has_image(folder):
    """True if ``folder`` (or a sub-folder) holds at least one image file; stops at the first one."""
    for _, _, files in os.walk(folder):
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
            return True
    return False


# ---------------------------------------------------------------------- signatures
def accepted_arguments(obj, skip=0):
    """Names ``obj`` (a class or function) accepts as keywords, and whether it takes ``**kwargs``.

    Args:
        obj: Class (its ``__init__``) or callable.
        skip (int): Leading positional parameters filled by the caller (e.g. ``params`` of an
            optimizer, ``optimizer`` of a scheduler, the two images of a metric).

    Returns:
        tuple[list[str], list[str], bool]: Accepted names, required names (no default), and
        whether arbitrary keywords are accepted.
    """
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return [], [], True
    params = [p for p in sig.parameters.values() if p.name != 'self']
    params = params[skip:]
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is p.empty]
    return names, required, var_kw


def _registry_lookup(registry, name):
    """The registered object for ``name`` (BasicSR also tries ``<name>_basicsr``), or None."""
    if not isinstance(name, str):
        return None
    for candidate in (name, f'{name}_basicsr'):
        if candidate in registry:
            return registry.get(candidate)
    return None


# ------------------------------------------------------------------------------ checker
class _Checker:

    def __init__(self, opt, is_train, check_files):
        from basicsr.utils.registry import (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY,
                                            MODEL_REGISTRY)
        self.opt = opt
        self.is_train = is_train
        self.check_files = check_files
        self.problems = []
        self.arch, self.dataset, self.loss = ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY
        self.metric, self.model = METRIC_REGISTRY, MODEL_REGISTRY
        self.plugin_keys = plugin_option_keys()
        self.model_cls = None
        self.suggested = set()

    def add(self, path, message):
        self.problems.append(f'{path}: {message}' if path else message)

    # -- generic helpers -----------------------------------------------------------------
    def registered(self, registry, kind, value, path):
        """Look ``value`` up in ``registry``; report an unknown name with the closest one."""
        if value is None:
            self.add(path, f'missing; name a registered {kind}')
            return None
        found = _registry_lookup(registry, value)
        if found is None:
            names = [k[:-len('_basicsr')] if k.endswith('_basicsr') else k for k in registry.keys()]
            self.add(path, f'unknown {kind} {value!r}{_hint(value, names)} '
                     f'(registered: {", ".join(sorted(names)[:40])}{" ..." if len(names) > 40 else ""})')
        return found

    def keys_against(self, section, path, allowed, patterns=(), owner=''):
        """Report every key of ``section`` not in ``allowed`` (nor matching a pattern)."""
        if not isinstance(section, dict):
            return
        for key in section:
            if key in allowed or any(re.fullmatch(p, str(key)) for p in patterns):
                continue
            where = f'{path}.{key}' if path else str(key)
            match = closest(key, allowed)
            if match is not None:  # a missing required key is then reported once, as this misspelling
                self.suggested.add(f'{path}.{match}' if path else match)
            self.add(where, f'unknown option{owner}{_hint(key, allowed)}')

    def require(self, path):
        """Report a required option that is not set (unless already reported as misspelt)."""
        if path not in self.suggested:
            self.add(path, 'required but not set' if '.' not in path else
                     f'required {"for training " if self.is_train else ""}but not set')

    def signature_keys(self, section, path, target, kind_name, skip=0, extra=('type',)):
        """Check the keys of ``section`` against ``target``'s signature; also required arguments."""
        names, required, var_kw = accepted_arguments(target, skip)
        if not var_kw:
            for key in section:
                if key in extra or key in names:
                    continue
                self.add(f'{path}.{key}', f'{kind_name} takes no argument {key!r}{_hint(key, names)} '
                         f'(it takes: {", ".join(names) or "nothing"})')
        missing = [name for name in required if name not in section]
        if missing:
            self.add(path, f'{kind_name} needs {", ".join(repr(m) for m in missing)}, which '
                     f'{"is" if len(missing) == 1 else "are"} not set')
        return names

    def file_exists(self, value, path, what='file', folder_ok=False):
        if not self.check_files or value is None:
            return
        if not isinstance(value, str):
            self.add(path, f'expected a path, got {value!r}')
            return
        ok = os.path.isfile(value) or (folder_ok and os.path.isdir(value))
        if not ok:
            self.add(path, f'{what} not found: {value!r} (relative paths are taken from the working '
                     f'directory {os.getcwd()!r})')

    # -- sections ----------------------------------------------------------------------------
    def run(self):
        opt = self.opt
        if not isinstance(opt, dict):
            self.add('', f'the option file must hold a mapping, got {type(opt).__name__}')
            return self.problems
        self.model_cls = self.registered(self.model, 'model', opt.get('model_type', 'SRModel')
                                         if 'model_type' in opt else None, 'model_type')
        self.top_level()
        for key, value in opt.items():
            if str(key).startswith('network_'):
                self.network(key, value)
        self.datasets(opt.get('datasets'))
        self.path(opt.get('path'))
        if self.is_train:
            self.train(opt.get('train'))
        self.val(opt.get('val'))
        if 'logger' in opt:
            self.keys_against(opt['logger'], 'logger', self.section_keys('logger'))
        if isinstance(opt.get('dist_params'), dict):
            self.keys_against(opt['dist_params'], 'dist_params', self.section_keys('dist_params'))
        return self.problems

    def section_keys(self, section):
        keys = set(BASICSR_SECTION_KEYS.get(section, ())) | set(self.plugin_keys)
        if section == 'top':
            keys |= BASICSR_TOP_KEYS
        if self.model_cls is not None:
            keys |= _class_option_keys(self.model_cls, section)
        return keys

    def top_level(self):
        opt = self.opt
        self.keys_against(opt, '', self.section_keys('top'), SECTION_PATTERNS['top'])
        required = ['name', 'model_type', 'num_gpu', 'datasets', 'path'] + (['train', 'logger'] if self.is_train
                                                                              else [])
        for key in required:
            if key not in opt:
                self.require(key)
        if not any(str(k).startswith('network_') for k in opt):
            self.add('network_g', 'required but not set (no network_* section)')
        num_gpu = opt.get('num_gpu', 0)
        if not (num_gpu == 'auto' or (isinstance(num_gpu, int) and not isinstance(num_gpu, bool) and num_gpu >= 0)):
            self.add('num_gpu', f"must be a non-negative integer or 'auto', got {num_gpu!r}")
        for key in ('datasets', 'path', 'train', 'val', 'logger', 'dist_params'):
            if key in opt and opt[key] is not None and not isinstance(opt[key], dict):
                self.add(key, f'must be a mapping, got {type(opt[key]).__name__} {opt[key]!r}')

    def network(self, key, net_opt):
        if not isinstance(net_opt, dict):
            self.add(key, f'must be a mapping with a type, got {net_opt!r}')
            return
        cls = self.registered(self.arch, 'network', net_opt.get('type'), f'{key}.type')
        if cls is None:
            return
        names = self.signature_keys(net_opt, key, cls, cls.__name__)
        for arg, value in net_opt.items():
            if arg in names and isinstance(value, str) and WEIGHT_ARG_RE.search(arg):
                self.file_exists(value, f'{key}.{arg}', 'weights file')

    def datasets(self, datasets):
        if not isinstance(datasets, dict):
            return
        for phase_key, ds_opt in datasets.items():
            path = f'datasets.{phase_key}'
            phase = str(phase_key).split('_')[0]
            if phase not in DATASET_PHASES:
                if closest(phase, DATASET_PHASES):
                    self.suggested.add(f'datasets.{closest(phase, DATASET_PHASES)}')
                self.add(path, f'unknown phase {phase!r}: dataset keys are train, val or test, optionally with '
                         f'a suffix (val_1, test_rain){_hint(phase, DATASET_PHASES)}')
            if not isinstance(ds_opt, dict):
                self.add(path, f'must be a mapping, got {ds_opt!r}')
                continue
            cls = self.registered(self.dataset, 'dataset', ds_opt.get('type'), f'{path}.type')
            if cls is not None:
                self.keys_against(ds_opt, path, dataset_option_keys(cls), owner=f' for {cls.__name__}')
            io_opt = ds_opt.get('io_backend') or {}
            io_type = io_opt.get('type') if isinstance(io_opt, dict) else None
            if io_type is not None and io_type not in ('disk', 'lmdb', 'memcached'):
                self.add(f'{path}.io_backend.type', f"unknown backend {io_type!r}{_hint(io_type, ('disk', 'lmdb'))}")
            for key, value in ds_opt.items():
                if str(key).startswith('dataroot') and isinstance(value, str):
                    self.file_exists(value, f'{path}.{key}', 'data folder', folder_ok=True)
                    if self.check_files and io_type in (None, 'disk') and os.path.isdir(value) \
                            and not _has_image(value):
                        self.add(f'{path}.{key}', f'no image files in {value!r}: the dataset would be empty')
                    if self.check_files and io_type == 'lmdb' and value.endswith('.lmdb') and os.path.isdir(value) \
                            and not os.path.isfile(os.path.join(value, 'meta_info.txt')):
                        self.add(f'{path}.{key}', f'LMDB folder {value!r} has no meta_info.txt (incomplete pack, '
                                 'or not made by BasicSR / perceive-ir pack)')
            if isinstance(ds_opt.get('meta_info_file'), str):
                self.file_exists(ds_opt['meta_info_file'], f'{path}.meta_info_file', 'meta info file')
        if self.is_train and 'train' not in datasets:
            self.require('datasets.train')

    def path(self, path_opt):
        if not isinstance(path_opt, dict):
            return
        self.keys_against(path_opt, 'path', self.section_keys('path'), SECTION_PATTERNS['path'])
        for key, value in path_opt.items():
            if str(key).startswith('pretrain_network_') or key == 'resume_state':
                what = 'training state' if key == 'resume_state' else 'weights file'
                if key == 'resume_state' and self.opt.get('auto_resume'):
                    continue
                self.file_exists(value, f'path.{key}', what)

    def train(self, train_opt):
        if not isinstance(train_opt, dict):
            return
        self.keys_against(train_opt, 'train', self.section_keys('train'), SECTION_PATTERNS['train'])
        if 'total_iter' not in train_opt:
            self.require('train.total_iter')
        for key, value in train_opt.items():
            if not isinstance(value, dict) or 'type' not in value:
                continue
            path = f'train.{key}'
            if key.startswith(('optim_', 'scheduler')) and self.model_cls is None:
                continue  # which optimizers/schedulers exist depends on the (unknown) model
            if key.startswith('optim_'):
                cls = self.named_choice(value['type'], self.optimizers(), 'optimizer', f'{path}.type')
                if cls is not None:
                    self.signature_keys(value, path, cls, cls.__name__, skip=1)
            elif key == 'scheduler':
                cls = self.named_choice(value['type'], self.schedulers(), 'scheduler', f'{path}.type')
                if cls is not None:
                    self.signature_keys(value, path, cls, cls.__name__, skip=1)
            elif key.endswith('_opt'):
                cls = self.registered(self.loss, 'loss', value.get('type'), f'{path}.type')
                if cls is not None:
                    names = self.signature_keys(value, path, cls, cls.__name__)
                    for arg, arg_value in value.items():
                        if arg in names and isinstance(arg_value, str) and WEIGHT_ARG_RE.search(arg):
                            self.file_exists(arg_value, f'{path}.{arg}', 'weights file')

    def named_choice(self, name, table, kind, path):
        if name in table:
            return table[name]
        self.add(path, f'unknown {kind} {name!r}{_hint(name, table)} (supported: {", ".join(sorted(table))})')
        return None

    def _plugin_model(self):
        from perceive_ir_plugin.models.image_restoration_model import ImageRestorationModel
        return self.model_cls is not None and issubclass(self.model_cls, ImageRestorationModel)

    def optimizers(self):
        """Optimizers the configured model builds by name (BasicSR 1.4.2: Adam only)."""
        import torch
        table = {'Adam': torch.optim.Adam}
        if self._plugin_model():
            from perceive_ir_plugin.models.image_restoration_model import OPTIMIZERS
            table.update(OPTIMIZERS)
        return table

    def schedulers(self):
        from basicsr.models.lr_scheduler import CosineAnnealingRestartLR, MultiStepRestartLR
        table = {'MultiStepLR': MultiStepRestartLR, 'MultiStepRestartLR': MultiStepRestartLR,
                 'CosineAnnealingRestartLR': CosineAnnealingRestartLR}
        if self._plugin_model():
            from perceive_ir_plugin.models.image_restoration_model import SCHEDULERS
            table.update(SCHEDULERS)
        return table

    def val(self, val_opt):
        if val_opt is None:
            return
        if not isinstance(val_opt, dict):
            return
        self.keys_against(val_opt, 'val', self.section_keys('val'))
        metrics = val_opt.get('metrics') or {}
        if not isinstance(metrics, dict):
            self.add('val.metrics', f'must be a mapping name -> {{type, ...}}, got {metrics!r}')
            return
        for name, metric_opt in metrics.items():
            path = f'val.metrics.{name}'
            if not isinstance(metric_opt, dict):
                self.add(path, f'must be a mapping with a type, got {metric_opt!r}')
                continue
            fn = self.registered(self.metric, 'metric', metric_opt.get('type'), f'{path}.type')
            if fn is not None:
                self.signature_keys(metric_opt, path, fn, fn.__name__, skip=2, extra=('type', 'better'))


def find_option_problems(opt, is_train=True, check_files=True):
    """List the problems of a parsed option dict (empty list when it is fine).

    Args:
        opt (dict): Options as read from the YAML file (before or after BasicSR's parsing).
        is_train (bool): Training options (``train``, ``logger``, ``datasets.train``
            required) or test options.
        check_files (bool): Check that the files and folders named exist.

    Returns:
        list[str]: One ``'<option.path>: <what is wrong>'`` line per problem.
    """
    import perceive_ir_plugin  # noqa: F401  (every registry entry must be known)
    return _Checker(opt, is_train, check_files).run()


def check_options(opt, is_train=True, check_files=True, source=None):
    """Raise :class:`OptionError` listing every problem of ``opt`` (see :func:`find_option_problems`)."""
    problems = find_option_problems(opt, is_train=is_train, check_files=check_files)
    if problems:
        raise OptionError(problems, source)


def load_option_file(path):
    """Read an option file with ``yaml.safe_load`` (Python-object tags are refused).

    Raises:
        FileNotFoundError: No such file.
        OptionError: Not valid YAML, or it uses a tag that would build Python objects.
    """
    if not os.path.isfile(str(path)):
        raise FileNotFoundError(f'Option file not found: {path!r} (argument -opt)')
    with open(path, encoding='utf-8') as f:
        text = f.read()
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        raise OptionError([f'{err.problem} {str(err.problem_mark).strip()}: the option file uses a YAML tag '
                           "that builds Python objects (BasicSR's loader would run it); only plain YAML values "
                           'are allowed'], path) from err
    except yaml.YAMLError as err:
        raise OptionError([f'not valid YAML: {err}'], path) from err


def check_option_file(path, is_train=True, overrides=(), check_files=True, auto_resume=False):
    """Load ``path`` safely, apply ``--force_yml`` overrides (``a:b=value``) and check it.

    Returns:
        dict: The loaded options (overrides applied).

    Raises:
        OptionError, FileNotFoundError: See :func:`load_option_file` / :func:`check_options`.
    """
    opt = load_option_file(path)
    if overrides:
        from perceive_ir_plugin.utils.launch import apply_overrides
        try:
            apply_overrides(opt, overrides)
        except (KeyError, ValueError) as err:
            raise OptionError([str(err.args[0]) if err.args else str(err)], path) from err
    if isinstance(opt, dict) and auto_resume:
        opt['auto_resume'] = True  # path.resume_state is then found, not read from the file
    check_options(opt, is_train=is_train, check_files=check_files, source=path)
    return opt


def check_pipeline_argv(argv, is_train):
    """Validate the option file named by a train/test command line before BasicSR reads it.

    Args:
        argv (list[str] | None): Arguments of ``perceive_ir_plugin.train``/``test``
            (default ``sys.argv[1:]``): ``-opt X.yml [--force_yml k=v ...] [--auto_resume] ...``.
        is_train (bool): Training or testing.

    Returns:
        dict | None: The checked options (as read from the file, overrides applied); None
        without ``-opt``.

    Raises:
        OptionError: With every problem found, each naming its option path.
    """
    from perceive_ir_plugin.utils.launch import split_force_yml, strip_local_rank
    args, overrides = split_force_yml(strip_local_rank(list(sys.argv[1:] if argv is None else argv)))
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', type=str, default=None)
    parser.add_argument('--auto_resume', action='store_true')
    known, _ = parser.parse_known_args(args)
    if known.opt is None:  # BasicSR's own parser reports the missing -opt (and answers --help)
        return None
    return check_option_file(known.opt, is_train=is_train, overrides=overrides, auto_resume=known.auto_resume)
