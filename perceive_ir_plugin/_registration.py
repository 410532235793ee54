"""Import the plugin's modules so that their registry decorators run.

BasicSR only scans its own package. Like Real-ESRGAN, each sub-package of the plugin
imports its own files that follow BasicSR's suffix convention (``*_arch.py``,
``*_dataset.py``, ``*_loss.py``, ``*_model.py``, ``*_metric.py``). Nothing else runs at
import time.
"""
import importlib
import os


def import_by_suffix(package_name, package_file, suffix):
    """Import every module ``<package>/<name><suffix>`` in sorted order.

    Args:
        package_name (str): Dotted package name, e.g. ``'perceive_ir_plugin.archs'``.
        package_file (str): ``__file__`` of that package's ``__init__``.
        suffix (str): File-name ending to select, e.g. ``'_arch.py'``.

    Returns:
        list[module]: The imported modules.
    """
    folder = os.path.dirname(os.path.abspath(package_file))
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(suffix))
    return [importlib.import_module(f'{package_name}.{name}') for name in names]
