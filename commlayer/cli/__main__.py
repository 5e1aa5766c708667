"""``python -m commlayer.cli`` = the ``commlayer`` console script."""

import sys

from commlayer.cli import main

sys.exit(main())
