"""``python -m pcdeq.bench``: the benchmark command line (:mod:`pcdeq.bench.cli`)."""

from pcdeq.bench.cli import main

main()
