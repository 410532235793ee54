"""The ``perceive-ir`` command line.

Sub-commands live in ``perceive_ir_plugin/tools/``; every module there that defines
``add_parser(subparsers)`` contributes one (``perceive-ir train``, ``test``, ``convert``,
``pack``, ...). ``perceive-ir --help`` lists them.
"""
import argparse
import importlib
import os
import sys


def _tool_modules():
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tools')
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith('.py') and not f.startswith('_'))
    return [importlib.import_module(f'perceive_ir_plugin.tools.{name}') for name in names]


def build_parser():
    """Build the top-level parser with one sub-parser per tool module."""
    parser = argparse.ArgumentParser(prog='perceive-ir', description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for module in _tool_modules():
        if hasattr(module, 'add_parser'):
            module.add_parser(subparsers)
    return parser


def main(argv=None):
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, 'func', None) is None:
        parser.print_help()
        return 2
    code = args.func(args)
    return 0 if code is None else int(code)


if __name__ == '__main__':
    sys.exit(main())
