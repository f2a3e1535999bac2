"""`python -m tasklease.controlplane`: see `cli.py`."""

import sys

from tasklease.controlplane.cli import main

sys.exit(main())
