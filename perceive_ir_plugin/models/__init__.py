"""Registers every ``*_model.py`` module of this folder in BasicSR's registries."""
from perceive_ir_plugin._registration import import_by_suffix

_modules = import_by_suffix(__name__, __file__, '_model.py')
