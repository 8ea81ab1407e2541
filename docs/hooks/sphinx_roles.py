"""MkDocs hook: the docstrings' Sphinx roles (:class:`~a.B`) shown as plain code in the API pages."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(<code>)~?")


def on_page_content(html: str, **_: object) -> str:
    return ROLE.sub(r"\1", html)
