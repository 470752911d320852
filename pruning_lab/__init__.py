"""The ``pruning-lab`` tool: one command (:mod:`pruning_lab.cli`) and the Hydra app behind ``pruning-lab run``
(:mod:`pruning_lab.run`). The library is :mod:`pruning`, the experiment layer :mod:`experiments`.

Imports nothing on purpose: ``pruning-lab --help`` must answer without loading torch.
"""
