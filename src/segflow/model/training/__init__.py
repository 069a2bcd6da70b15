"""segflow.model.training."""
