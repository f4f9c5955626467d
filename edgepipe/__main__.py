"""python -m edgepipe."""

import sys

from edgepipe.cli import main

sys.exit(main())
