"""segflow: a cached, rerunnable pipeline for Kaggle-style image segmentation.

The package holds all logic; the Snakemake workflow only wires its CLI stages together.
It never imports snakemake.
"""

from segflow.core.errors import SegflowError

__all__ = ["SegflowError", "__version__"]
__version__ = "0.1.0"
