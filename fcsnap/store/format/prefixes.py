"""Short build ids: a prefix of a build id's text names the build, as git and docker allow.

A prefix needs at least MIN_DIGITS hex digits so that a short word is never taken for an id by
accident; an ambiguous prefix is refused, naming the builds it could mean, rather than guessed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from fcsnap.errors import FcsnapError

MIN_DIGITS = 4
SHORT_DIGITS = 8  # what tables show, as git and docker do
_PREFIX = re.compile(r"[0-9a-f][0-9a-f-]*")
_NAMED_MAX = 5  # candidates an ambiguity error names before "and N more"


def is_prefix(text: str) -> bool:
    """True when `text` has the form of a short build id (>= MIN_DIGITS hex digits)."""
    lowered = text.lower()
    digits = len(lowered.replace("-", ""))
    return bool(_PREFIX.fullmatch(lowered)) and MIN_DIGITS <= digits < 32


def match_prefix(text: str, ids: Iterable[uuid.UUID], where: str) -> uuid.UUID | None:
    """The one build id among `ids` that `text` is a prefix of; None when none is. More than
    one is an FcsnapError naming them."""
    lowered = text.lower()
    found = sorted(i for i in ids if str(i).startswith(lowered))
    if len(found) > 1:
        named = ", ".join(str(i) for i in found[:_NAMED_MAX])
        more = f" and {len(found) - _NAMED_MAX} more" if len(found) > _NAMED_MAX else ""
        raise FcsnapError(f"build id prefix {text!r} is ambiguous in store {where}: "
                          f"it matches {named}{more}")
    return found[0] if found else None


def short_id(build_id: str) -> str:
    """The first SHORT_DIGITS hex digits of a build id's text, for tables."""
    return build_id[:SHORT_DIGITS]
