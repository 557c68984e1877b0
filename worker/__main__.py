"""``python -m planwire.worker`` runs the plan-worker."""

import sys

from planwire.worker.cli import main

sys.exit(main())
