"""``perceive-ir train``: BasicSR training with the plugin registered (see ``perceive_ir_plugin/train.py``)."""
from perceive_ir_plugin.tools.test import add_basicsr_arguments, to_basicsr_argv


def run(args):
    """Entry of ``perceive-ir train``; returns the exit code."""
    from perceive_ir_plugin.train import main
    return main(to_basicsr_argv(args))


def add_parser(subparsers):
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        'train', help='train with BasicSR train_pipeline (experiments/ under the working directory)',
        description='Run BasicSR 1.4.2 train_pipeline with the plugin registered. experiments/ and tb_logger/ '
        'are created under the current working directory.')
    add_basicsr_arguments(parser, train=True)
    parser.set_defaults(func=run)
