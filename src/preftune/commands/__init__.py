"""The commands layer: one handler per row of cli.py's table, each taking the parsed
``argparse.Namespace``, printing for people and returning an exit code. Handlers call the library
(training, evaluation, report, serving); no library module imports from here.

  training.py    config show, losses, sft, dpo, orpo, merge, pipeline, quickstart, iterate, sweep
  evaluation.py  eval and its parts, generate, chat, report
  tools.py       data inspect, data synth, serve, push, export, config from-trl / from-axolotl /
                 from-llamafactory
"""

from __future__ import annotations

from preftune.logs import setup_logging  # noqa: F401  (the one logging set-up, re-exported for handlers)
