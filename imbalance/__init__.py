"""imbalance: learning image classifiers from imbalanced data, every remedy in one Lightning repository."""

__version__ = "0.1.0"
