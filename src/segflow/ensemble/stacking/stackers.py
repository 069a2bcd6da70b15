"""The two stacked candidates and the ``stack`` options each one reads.

``segflow stack --candidate gate|pixel`` fits one of them; the workflow runs one ``stack`` job
per candidate and passes each only its own options, so editing an option reruns just the
candidate that reads it (``stack.pixels_per_image`` never refits the gate). Kept free of heavy
imports: the Snakefile reads it when it plans.
"""

from __future__ import annotations

STACKERS: tuple[str, ...] = ("gate", "pixel")
"""``gate``: the image-level gate on the ensemble (and per-image thresholds); ``pixel``: the
pixel-level blender of the experiments' maps."""

STACKER_OPTIONS: dict[str, tuple[str, ...]] = {
    "gate": ("backend", "seed", "threshold_target", "blob_sigmas", "blob_threshold"),
    "pixel": ("backend", "seed", "pixels_per_image"),
}
"""The ``stack`` config keys (``StackOptions`` fields) each candidate reads."""


def candidate_name(stacker: str) -> str:
    """The candidate a stacker writes: ``gate`` -> ``stack_gate``.

    Raises:
        KeyError: an unknown stacker (the message lists the valid ones).
    """
    if stacker not in STACKERS:
        raise KeyError(f"unknown stacker {stacker!r}; valid: {', '.join(STACKERS)}")
    return f"stack_{stacker}"


MODEL_PREFIX: dict[str, tuple[str, ...]] = {"gate": ("gate", "threshold"), "pixel": ("blender",)}
"""The model files each stacker writes per class (``<prefix>_model<suffix>``): the gate's (and,
with ``threshold_target``, the per-image threshold regressor's), the pixel blender's."""


def summary_name(stacker: str) -> str:
    """A stack job's summary file in the stack folder: ``summary_<stacker>.json``."""
    candidate_name(stacker)
    return f"summary_{stacker}.json"


def model_name(k: int, prefix: str, suffix: str) -> str:
    """A fitted model's file in the stack folder: ``class_<k>/<prefix>_model<suffix>``
    (``suffix``: the backend's, ``.txt`` LightGBM or ``.cbm`` CatBoost)."""
    return f"class_{k}/{prefix}_model{suffix}"
