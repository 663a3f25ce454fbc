"""The reproduction layer: the paper's tables from specs to files.

:mod:`~pcdeq.reproduction.reproduce` reads the table specs (``experiments/*.yaml``) and profiles, plans the runs
each table needs and launches the missing ones through ``train.py`` / ``eval.py`` multiruns;
:mod:`~pcdeq.reproduction.aggregate` turns the finished runs' ``results.json`` into Markdown, CSV and LaTeX tables
and a report, with :mod:`~pcdeq.reproduction.adhoc` for a user's own sweeps and :mod:`~pcdeq.reproduction.plots` /
:mod:`~pcdeq.reproduction.adhoc_plots` for the figures. The commands are ``python -m pcdeq.reproduce`` and
``python -m pcdeq.aggregate`` (``make reproduce-tables``, ``make tables``).
"""
