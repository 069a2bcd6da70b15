"""Inference: ``predict`` (``segflow predict-oof``/``predict-test``; writes prediction folders
through :mod:`segflow.artifacts.predictions`), test-time augmentation (``tta``) and sliding-window
``tiling``."""
