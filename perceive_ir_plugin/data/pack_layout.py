"""Folder layout of packed all-in-one data.

``<root>/<split>/<task>/gt.lmdb``, ``<root>/<split>/<task>/lq.lmdb`` (absent where the degradation
is synthesised at load time: denoising) and ``<root>/<split>/<task>/pack.json``. ``pack.json`` is
written last, atomically, when a task is completely packed; a folder without it is an interrupted
pack that ``perceive-ir pack`` resumes.
"""
import json
import os

from perceive_ir_plugin.data.lmdb_io import PackError, _atomic_write_text

PACK_JSON = 'pack.json'
SPLITS = ('train', 'test')
PACK_VERSION = 1


def pack_dir(root, split, task):
    """``<root>/<split>/<task>``."""
    return os.path.join(str(root), split, task)


def write_pack_info(directory, info):
    """Atomically write ``pack.json`` (dict with task, split, count, format, source, has_lq, ...)."""
    info = dict(info, version=PACK_VERSION)
    _atomic_write_text(os.path.join(directory, PACK_JSON), json.dumps(info, indent=2, sort_keys=True) + '\n')


def read_pack_info(directory, task=None, split=None):
    """Read ``pack.json`` of a task pack, with errors that say what to do.

    Args:
        directory (str): ``<root>/<split>/<task>``.
        task (str | None): Expected task (checked against the file).
        split (str | None): Expected split (checked against the file).

    Returns:
        dict: The pack description.
    """
    if not os.path.isdir(directory):
        parent = os.path.dirname(directory.rstrip('/'))
        have = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
        raise FileNotFoundError(f"No pack for task '{task}' (split '{split}') at {directory}; "
                                f'{parent} holds {have if have else "nothing"}. '
                                'Create it with `perceive-ir pack` (e.g. `--layout demo`).')
    path = os.path.join(directory, PACK_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is missing: the pack of task {task!r} is incomplete (interrupted '
                                'packing?). Re-run the same `perceive-ir pack` command to resume it.')
    try:
        with open(path, 'r', encoding='utf-8') as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise PackError(f'{path} is unreadable ({err}); re-run `perceive-ir pack` to rewrite it') from err
    for name, want in (('task', task), ('split', split)):
        if want is not None and info.get(name) != want:
            raise PackError(f'{path} describes {name} {info.get(name)!r}, expected {want!r}')
    return info
