"""``python -m pcdeq.reproduce``: train what the tables need (the code is :mod:`pcdeq.reproduction.reproduce`)."""

import sys

from pcdeq.reproduction.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
