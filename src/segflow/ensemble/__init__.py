"""segflow.ensemble."""
