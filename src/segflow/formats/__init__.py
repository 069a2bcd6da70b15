"""segflow.formats."""
