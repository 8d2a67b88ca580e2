"""The commands layer: one handler per row of cli.py's table, each taking the parsed
``argparse.Namespace``, printing for people and returning an exit code. Handlers call the library
(training, evaluation, report, serving); no library module imports from here.

  training.py    config show, sft, dpo, orpo, merge, pipeline, quickstart, sweep
  evaluation.py  eval and its parts, generate, chat, report
  tools.py       data inspect, data synth, serve, push
"""

from __future__ import annotations

import logging


def setup_logging() -> None:
    logging.basicConfig(format="preftune: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "accelerate", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
