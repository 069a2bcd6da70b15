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
