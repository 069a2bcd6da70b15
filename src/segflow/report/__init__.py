"""What a run produced, for a person (rule in ``workflow/rules/report.smk``):

- ``report`` (``segflow report``): one self-contained HTML page; ``figures`` draws its PNGs.
- ``summary`` (``segflow summary``): the same facts as text on the terminal.

Developers: the report reads only artifacts (through :mod:`segflow.artifacts` where a format
has a reader); it may import every layer, nothing imports it.
"""
