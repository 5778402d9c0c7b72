"""``python -m scheduler`` is the ``vmsched`` command."""

import sys

from scheduler.cli import main

sys.exit(main())
