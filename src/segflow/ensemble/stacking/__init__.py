"""Stacking (``segflow stack``): an image-level gate and a pixel blender on the experiments'
OOF, cross-fitted on the folds; see :mod:`segflow.ensemble`."""
