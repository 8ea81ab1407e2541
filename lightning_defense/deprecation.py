"""Earlier names kept working for one release, each with a warning that says where it went."""

from __future__ import annotations

import warnings


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is now ``new`` and that the old name goes in the next release."""
    warnings.warn(f"{old} is now {new}; the old name goes in the next release.", FutureWarning, stacklevel=stacklevel)
