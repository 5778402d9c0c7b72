"""``python -m scheduler`` is the ``vmsched`` command."""

import sys

from scheduler.entry import main

sys.exit(main())
