"""``python -m gazecam`` runs the command line."""

import sys

from gazecam.cli import main

sys.exit(main())
