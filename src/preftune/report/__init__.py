"""Reports: run, pipeline and sweep folders -> Markdown and self-contained HTML with PNG figures
(``preftune report``). ``runs.py`` reads the folders, ``table.py`` renders the results table,
``report.py`` builds the tables and the page, ``plots.py`` draws; ``inspect.py`` reports what a
dataset becomes after tokenization (``preftune data inspect``). Importing the package loads none
of them (matplotlib is heavy)."""
