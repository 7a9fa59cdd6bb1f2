"""``python -m mlkd`` (and ``torchrun -m mlkd``): the same command line as the ``mlkd`` script."""

import sys

from mlkd.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
