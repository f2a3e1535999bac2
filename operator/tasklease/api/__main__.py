"""`python -m tasklease.api`: the same as `python -m tasklease.api.crd`."""

import sys

from tasklease.api.crd import main

sys.exit(main())
