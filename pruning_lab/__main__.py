"""``python -m pruning_lab`` = ``pruning-lab``."""

import sys

from pruning_lab.cli import main

sys.exit(main())
