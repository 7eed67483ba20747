"""peftfx.passes: one graph rewrite per file; importing this package registers them all.

Every module here registers its pass with ``@register_pass(section, after=..., before=...)`` at
import; the pass manager orders them by those constraints, so adding a pass is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
