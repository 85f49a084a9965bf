"""`python -m kevlarflow`: the same as the `kevlarflow` command."""
import sys

from kevlarflow.cli import main

sys.exit(main())
