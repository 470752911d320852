"""Hydra instantiates a sweeper only from the ``hydra_plugins`` namespace (hydra.core.plugins.Plugins), so the
AdaPruner study sweeper is registered here; the study itself is experiments/adapruner.py."""

from experiments import adapruner


class AdaPrunerSweeper(adapruner.StudySweeper):
    """``hydra.sweeper`` of conf/experiment/adapruner.yaml."""
