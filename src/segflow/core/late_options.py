"""Options added after outputs were published, left out of those outputs at their defaults.

An options dataclass names such fields in a class attribute ``_omit_at_default`` (a tuple);
:func:`published_options` is its plain-dict view without them while they hold their default, so
the JSON summaries, checkpoints and hashes written with the default stay byte-identical to those
written before the fields existed. Building the dataclass from the dict restores them.

A module of its own, not a change of :func:`segflow.core.options.options_to_dict`: a change
there would change the code fingerprint of every stage (segflow.core.fingerprint), and rerun
stages that have none of these options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

OMIT_AT_DEFAULT = "_omit_at_default"
"""Name of the class attribute that lists an options dataclass's late fields."""


def published_options(options: Any) -> dict[str, Any]:
    """Plain-dict view of an options dataclass, its late fields left out at their defaults.

    Args:
        options: an options dataclass instance.

    Returns:
        ``dataclasses.asdict(options)`` less the fields named in its class's
        ``_omit_at_default`` tuple (:data:`OMIT_AT_DEFAULT`) that equal their default.
    """
    values = dataclasses.asdict(options)
    late = getattr(options, OMIT_AT_DEFAULT, ())
    for field in dataclasses.fields(options):
        if field.name in late and values[field.name] == field.default:
            del values[field.name]
    return values
