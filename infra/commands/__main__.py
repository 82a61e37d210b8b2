"""`python -m infra.commands`: mnist-cloud without its console script (a wheel unpacked with --target)."""

import sys

from infra.commands import main

sys.exit(main())
