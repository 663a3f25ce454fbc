"""The reproduction layer: the paper's tables from specs to files.

:mod:`~pcdeq.reproduction.specs` reads the table specs (``experiments/*.yaml``) and profiles,
:mod:`~pcdeq.reproduction.plan` lists the runs each table needs and finds those that exist, and
:mod:`~pcdeq.reproduction.reproduce` launches the missing ones through ``train.py`` / ``eval.py`` multiruns;
:mod:`~pcdeq.reproduction.aggregate` turns the finished runs' ``results.json`` into Markdown, CSV and LaTeX tables
and a report, with :mod:`~pcdeq.reproduction.adhoc` for a user's own sweeps and :mod:`~pcdeq.reproduction.plots` /
:mod:`~pcdeq.reproduction.adhoc_plots` for the figures. The commands are ``python -m pcdeq.reproduce`` and
``python -m pcdeq.aggregate`` (``make reproduce-tables``, ``make tables``).
"""
