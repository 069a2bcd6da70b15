"""Hyperparameter search (``search.<study>``): Optuna studies run by parallel workers."""
