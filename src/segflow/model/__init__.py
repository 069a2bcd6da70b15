"""The model stages (rules in ``workflow/rules/model.smk`` and ``budget.smk``).

- ``training/``: ``train`` (``segflow train``: a fold or the full refit) and its parts:
  ``train_options`` (no torch), ``fold_data`` (datasets, loaders, seeding), ``schedules``,
  ``mixing``, ``checkpointing`` (resume state, EMA, snapshot averaging), ``transfer``
  (``init_from``, freezing), ``refit`` (options, epoch count; no torch), ``losses``, ``augment``.
- ``inference/``: ``predict`` (``segflow predict-oof``/``predict-test``), ``tta``, ``tiling``.
- ``evaluate_oof`` (``segflow evaluate-oof``), ``tune_postprocess`` (``segflow tune-postprocess``;
  the grid itself is ``postprocess``), ``submit`` (``segflow submit``).
- ``budget`` (options, the plan arithmetic, the plan file) and ``budget_measure`` (timing;
  ``segflow plan-budget``). plan-budget's code fingerprint covers ``budget`` only, and train's
  leaves ``budget`` out (the plan file carries it): see :data:`segflow.stages.STAGES`.
- Shared: ``experiment`` (an experiment's sections parsed), ``models`` (+ ``pretrained``),
  ``datasets`` (the arrays as torch datasets), ``metrics``, ``diagnostics`` (constant-prediction
  checks, read by choose and the report).

Developers: torch is imported here and in nothing below (core, formats, artifacts, data).
"""
