"""Perceive-IR for BasicSR: all-in-one image restoration with fine-grained quality perception.

Importing this package

1. installs the ``torchvision.transforms.functional_tensor`` alias that BasicSR 1.4.2
   needs on current torchvision (before BasicSR is first imported), then
2. imports the plugin's ``archs``, ``data``, ``losses``, ``metrics`` and ``models``
   sub-packages, whose classes register themselves in BasicSR's registries.

Importing it twice, or after ``basicsr``, is safe.
"""
import perceive_ir_tv_alias

perceive_ir_tv_alias.install()

from perceive_ir_plugin.version import __version__  # noqa: E402
from perceive_ir_plugin import archs, data, losses, metrics, models  # noqa: E402,F401

__all__ = ['__version__']
