"""Alias ``torchvision.transforms.functional_tensor`` for BasicSR 1.4.2.

BasicSR 1.4.2 (the last PyPI release) imports ``rgb_to_grayscale`` from
``torchvision.transforms.functional_tensor``, a module torchvision removed in 0.17.
Because ``import basicsr`` imports every BasicSR submodule, that one line breaks the
whole package. This module installs a meta-path finder that answers for exactly
that name with ``torchvision.transforms.functional`` (which still provides
``rgb_to_grayscale``). It imports nothing heavy itself: torchvision is only imported
when somebody asks for the old module name.

It is a top-level module (stdlib only) so that it can be used twice: by
``perceive_ir_plugin/__init__.py`` before BasicSR is first
imported, and by the ``perceive_ir_tv_alias.pth`` start-up hook that ``setup.py``
installs, so that ``import basicsr`` works even before the plugin is imported.
"""
import importlib
import importlib.abc
import importlib.util
import sys

OLD_NAME = 'torchvision.transforms.functional_tensor'
NEW_NAME = 'torchvision.transforms.functional'


class _AliasLoader(importlib.abc.Loader):

    def create_module(self, spec):
        return importlib.import_module(NEW_NAME)

    def exec_module(self, module):
        # The module returned by create_module is already initialised.
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``OLD_NAME`` to ``NEW_NAME`` when the old module does not exist."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != OLD_NAME:
            return None
        # Prefer a real module if an old torchvision still ships one.
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            try:
                spec = finder.find_spec(fullname, path, target)
            except (ImportError, AttributeError, ValueError):
                spec = None
            if spec is not None:
                return spec
        return importlib.util.spec_from_loader(fullname, _AliasLoader())


def install():
    """Install the finder once; calling it again is a no-op.

    Returns:
        bool: True if the finder was added by this call.
    """
    if any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        return False
    sys.meta_path.append(_AliasFinder())
    return True
