"""segflow.ensemble.stacking."""
