"""Classes of optional libraries, looked up only once the user imported them.

The plugin never imports transformers, timm or torchvision to ask whether a module is one of theirs: a model of
theirs means their module is in ``sys.modules`` already, and a class that is not there cannot be the model's.
"""

from __future__ import annotations

import sys
from typing import Any


def imported_class(module_name: str, class_name: str) -> type[Any] | None:
    """``module_name.class_name`` if that module is imported already, else ``None`` (nothing is imported here).

    Example:
        >>> imported_class("collections", "OrderedDict").__name__
        'OrderedDict'
        >>> imported_class("not_a_module", "Anything") is None
        True
    """
    found = getattr(sys.modules.get(module_name), class_name, None)
    return found if isinstance(found, type) else None
