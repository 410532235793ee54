"""The ``perceive-ir demo`` pipeline: real-image stand-in data → stage 1 → stage 2 vs L1 → report.

Helper modules (imported explicitly by :mod:`perceive_ir_plugin.tools.demo` and the tests):

* :mod:`perceive_ir_plugin.demo.logs` -- capture BasicSR's log records of a pipeline run
  (per-step log files, progress bars) and parse training losses / test metrics from them;
* :mod:`perceive_ir_plugin.demo.report` -- results table (markdown + CSV), plots, image strips;
* :mod:`perceive_ir_plugin.demo.pipeline` -- the steps, each a function.
"""
