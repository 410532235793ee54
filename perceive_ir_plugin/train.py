"""Train with BasicSR's ``train_pipeline`` and the plugin registered.

Usage (run from the folder that should hold ``experiments/`` and ``tb_logger/``)::

    python -m perceive_ir_plugin.train -opt options/train/NAFNet/GoPro-width32.yml [--auto_resume]
    torchrun --nproc_per_node=2 -m perceive_ir_plugin.train -opt X.yml --launcher pytorch
    perceive-ir train -opt X.yml

Works on CPU (``num_gpu: 0``; distributed runs then use gloo) and GPU; see
:mod:`perceive_ir_plugin.utils.launch` for the BasicSR 1.4.2 quirks fixed at start-up.
"""
import sys

from perceive_ir_plugin.utils.launch import run_pipeline
from perceive_ir_plugin.utils.option_check import check_pipeline_argv


def main(argv=None, root_path=None):
    """Run training; ``argv`` defaults to ``sys.argv[1:]``, ``root_path`` to the working directory."""
    check_pipeline_argv(argv, is_train=True)  # every bad option reported before anything is built
    return run_pipeline('train', argv, root_path)


if __name__ == '__main__':
    sys.exit(main())
