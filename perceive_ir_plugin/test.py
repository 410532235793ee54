"""Test with BasicSR's ``test_pipeline`` and the plugin registered.

Usage (run from the folder that should hold ``results/``)::

    python -m perceive_ir_plugin.test -opt options/test/PromptIR/PromptIR_3task.yml
    perceive-ir test -opt X.yml

Results (log, images) go to ``results/<name>/`` under the current working directory.
"""
import sys

from perceive_ir_plugin.utils.launch import run_pipeline
from perceive_ir_plugin.utils.option_check import check_pipeline_argv


def main(argv=None, root_path=None):
    """Run testing; ``argv`` defaults to ``sys.argv[1:]``, ``root_path`` to the working directory."""
    check_pipeline_argv(argv, is_train=False)  # every bad option reported before anything is built
    return run_pipeline('test', argv, root_path)


if __name__ == '__main__':
    sys.exit(main())
