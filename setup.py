"""What pyproject.toml cannot say: the repository's top-level conf/ ships inside the wheel as the package
``pruning_lab.conf`` (found by the Hydra app, pruning_lab/run.py), so an installed package runs from any directory.

Data directories (conf groups, pruning/assets) are listed as namespace packages, as setuptools asks for package data
in subdirectories. benchmarks/ measures a checkout against its results/ and does not ship.
"""

from setuptools import find_namespace_packages, setup

CODE = [
    "pruning",
    "pruning.*",
    "experiments",
    "experiments.*",
    "pruning_lab",
    "pruning_lab.*",
    "hydra_plugins",
]  # hydra_plugins: a namespace package Hydra scans for the AdaPruner study sweeper
CONF = ["pruning_lab.conf", *(f"pruning_lab.conf.{group}" for group in find_namespace_packages("conf"))]

setup(
    packages=[*find_namespace_packages(include=CODE, exclude=["*.__pycache__"]), *CONF],
    package_dir={"pruning_lab.conf": "conf"},
)
