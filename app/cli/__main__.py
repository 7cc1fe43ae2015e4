"""`python -m app.cli`: how Covey starts its own node and how autostart entries run it."""

import sys

from app.cli.command import main

sys.exit(main())
