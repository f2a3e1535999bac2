"""`python -m tasklease.executor`: see `cli.py`."""

import sys

from tasklease.executor.cli import main

sys.exit(main())
