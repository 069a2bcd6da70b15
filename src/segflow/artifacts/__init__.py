"""The contracts between stages: each file format one stage writes and another reads.

One module per format, each the only reader and writer of its files; stages, the report and
the workflow's ``common.smk`` call these instead of re-deriving names or paths:

- :mod:`~segflow.artifacts.tables`: ingest's manifest (with its data roots and path checks:
  no path read back leaves them) and dedup's items (Parquet), folds.csv.
- :mod:`~segflow.artifacts.arrays`: preprocess's arrays, ``index.parquet`` and ``stats.json``.
- :mod:`~segflow.artifacts.predictions`: prediction folders (``ids.csv`` + ``probs.npy``), OOF
  folders (``oof_ids.csv`` + ``oof_probs.npy``), the ``nonempty_prob_<k>`` gate columns.
- :mod:`~segflow.artifacts.truths`: the training labels at the original resolution, decoded
  from the manifest, and truth-masks' array of them (``masks.npy`` and ``ids.csv``), which the
  OOF stages read.
- :mod:`~segflow.artifacts.image_scores`: tune-postprocess's per-image OOF scores (tuned and
  constant predictions), which choose reads.
- :mod:`~segflow.artifacts.layout`: where in the results folder each stage writes.

Developers: artifacts import only :mod:`segflow.core` and :mod:`segflow.formats` (and
numpy/pandas, never torch), so a stage's code fingerprint stays narrow. Changing a format here
changes every stage that reads it: rerun the producer (``snakemake -R <rule>``).
"""
