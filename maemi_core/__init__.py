"""MAEMI-Ops core library: data, vision, teacher, model, training, evaluation, registry.

Nothing in this package imports Dagster; ``maemi_dagster`` only wires it.
"""

__version__ = "0.1.0"
