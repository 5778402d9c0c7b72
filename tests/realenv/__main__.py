"""``python -m tests.realenv up|down|status|purge [--dir DIR]``."""

from tests.realenv.realenv import main

raise SystemExit(main())
