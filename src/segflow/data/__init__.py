"""The data stages (rules in ``workflow/rules/data.smk``), one module each:

``demo_data`` (``segflow demo-data``), ``ingest``, ``dedup``, ``preprocess``, ``folds``. Each
module holds its options dataclass, its logic, and ``add_arguments``/``run`` for its
sub-command; tests are ``tests/test_<module>.py``.

Developers: data stages read and write through :mod:`segflow.artifacts` (the manifest, dedup
items, the preprocessed arrays) and import only core, formats and artifacts.
"""
