"""Training: ``train`` (the fold trainer and ``train_full``, and ``segflow train``) and the
concepts it is split into; see :mod:`segflow.model`."""
