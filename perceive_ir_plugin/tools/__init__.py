"""Sub-commands of the ``perceive-ir`` command line (see ``perceive_ir_plugin/cli.py``).

Each module here defines ``add_parser(subparsers)`` (adds its sub-command and sets
``func`` to its entry function taking the parsed ``argparse.Namespace``).
"""
