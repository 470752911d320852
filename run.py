"""Run one pruning cell (``python run.py``) or a sweep (``python run.py -m method=a,b pruning.ratio=0.2,0.5``).

The source checkout's spelling of ``pruning-lab run``: both call the Hydra app in pruning_lab/run.py.
"""

import sys

from pruning_lab.run import cli

if __name__ == "__main__":
    cli(sys.argv[1:], prog=sys.argv[0])
