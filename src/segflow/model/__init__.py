"""segflow.model."""
