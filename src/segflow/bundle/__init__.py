"""Shipping the final choice to an offline notebook: ``archive`` (the bundle zip's one reader and
writer: members, checksums, versions), ``export`` (``segflow export``: a results folder's final
choice -> bundle) and ``predict_bundle`` (``segflow predict-bundle``: bundle + image folder ->
submission, no results folder, no Snakemake). It sits above ``ensemble``: a bundle replays the
blend, the post-processing and the submission with the pipeline's own functions."""
