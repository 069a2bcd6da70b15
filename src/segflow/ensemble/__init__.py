"""The second-level stages (rules in ``workflow/rules/ensemble.smk``), one module each:

- ``blend`` (``segflow blend``): weights tuned on OOF, the ensemble's OOF (the search:
  ``weights``, pure arrays); ``apply_blend`` (``segflow apply-blend``): those weights applied to
  the test predictions, so a test-set change reruns the apply only.
- ``select_pseudo`` (``segflow select-pseudo``): pseudo-labels for the next round (the policy:
  ``pseudo``, pure arrays).
- ``stacking/``: ``stack`` (``segflow stack --candidate gate|pixel``: the fit, on OOF),
  ``apply_stack`` (``segflow apply-stack``: the fitted models on the test set), ``stackers`` (the two
  stacked candidates and the options each reads), ``features``, ``learners`` (LightGBM/CatBoost
  behind one interface, cross-fitting), ``threshold`` (per-image thresholds).
- ``choose`` (``segflow choose``): every candidate's scores, the final submission.

Every candidate (``ensemble``, ``stack_gate``, ``stack_pixel``) is written in an experiment's
layout (the OOF side by ``candidates.write_oof_candidate``), so tuning, submission and the final choice need no
special cases; gates travel as ``nonempty_prob_<k>`` columns
(:mod:`segflow.artifacts.predictions`).
"""
