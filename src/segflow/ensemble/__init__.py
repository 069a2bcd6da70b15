"""The second-level stages (rules in ``workflow/rules/ensemble.smk``), one module each:

- ``blend`` (``segflow blend``): weights tuned on OOF (the search: ``weights``, pure arrays).
- ``select_pseudo`` (``segflow select-pseudo``): pseudo-labels for the next round (the policy:
  ``pseudo``, pure arrays).
- ``stacking/``: ``stack`` (``segflow stack --candidate gate|pixel``), ``stackers`` (the two
  stacked candidates and the options each reads), ``features``, ``learners`` (LightGBM/CatBoost
  behind one interface, cross-fitting), ``threshold`` (per-image thresholds).
- ``choose`` (``segflow choose``): every candidate's scores, the final submission.

Every candidate (``ensemble``, ``stack_gate``, ``stack_pixel``) is written in an experiment's
layout by ``candidates.write_candidate``, so tuning, submission and the final choice need no
special cases; gates travel as ``nonempty_prob_<k>`` columns
(:mod:`segflow.artifacts.predictions`).
"""
