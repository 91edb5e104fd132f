"""``python -m fit_implicit.backend``: the command line (backend/cli.py)."""
import sys

from fit_implicit.backend.cli import main

if __name__ == "__main__":
    sys.exit(main())
