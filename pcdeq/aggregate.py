"""``python -m pcdeq.aggregate``: tables from the finished runs (the code is :mod:`pcdeq.reproduction.aggregate`)."""

import sys

from pcdeq.reproduction.aggregate import main

if __name__ == "__main__":
    sys.exit(main())
