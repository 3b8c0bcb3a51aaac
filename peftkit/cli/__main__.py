"""``python -m peftkit.cli`` (what ``accelerate launch -m peftkit.cli`` runs)."""

import sys

from peftkit.cli import main

sys.exit(main())
