"""segflow.model.inference."""
