"""Reports: run, pipeline and sweep folders -> Markdown and self-contained HTML with PNG figures
(``preftune report``). ``report.py`` reads the folders and builds the tables; ``plots.py`` draws."""

from preftune.report.report import write_report

__all__ = ["write_report"]
