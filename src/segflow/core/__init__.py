"""Infrastructure every stage uses; no image, model or pipeline knowledge.

- ``errors``: :class:`SegflowError`, the one exception a user sees (one line, exit status 2).
- ``atomic``: every artifact is written through these writers (temp file + rename), so a
  killed job never leaves a half-written file; ``write_torch`` reports a full disk as such.
- ``parallel``: process pools with ordered results; ``devices``: CPU/GPU choice and the GPU
  slot locks (``compute`` pins a job's threads and GPU).
- ``options``: stage options are dataclasses; config keys, fields and CLI flags share a name.
- ``fingerprint``: the code hash in each rule's ``params.code`` (snakemake#1694).
- ``config_check``: the config's first bad key, named before Snakemake's validation.
- ``stage_args``: a stage's arguments: the command-line flags several stages share, and the
  provenance block (the options it ran with) every metrics/summary JSON carries.

Developers: ``core`` imports nothing else from segflow (``tests/test_layers.py``).
"""
