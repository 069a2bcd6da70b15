"""File formats of the outside world: images, RLE masks, packed labels.

- ``imageio``: decode PNG/JPEG/TIFF/DICOM (with its HU window) to arrays, safely.
- ``rle``: Kaggle run-length encoding (both pixel orders).
- ``labels``: masks are packed labels (bit k = class k; binary data: uint8 {0, 1}); read a
  manifest item's mask only through ``labels.read_label``.

Developers: imports only :mod:`segflow.core` (``tests/test_layers.py``).
"""
