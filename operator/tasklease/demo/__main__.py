"""`python -m tasklease.demo` (`make demo`): see `__init__.py`."""

import sys

from tasklease.demo import main

sys.exit(main())
