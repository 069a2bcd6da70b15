"""segflow.core."""
