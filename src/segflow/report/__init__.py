"""segflow.report."""
