"""Task kinds: one module per kind of downstream task, each owning how its examples are
read from files, encoded into rows, what head and loss they need, how predictions are
decoded and which metrics score them (`registry.Kind`).

A new kind is one module in this package holding a `Kind` subclass decorated with
`@register`: every module here is imported below, so nothing else changes. Code
outside the package asks the registry (`lookup`, `detect`, `score`) and never names
a kind.
"""

import importlib
import pkgutil

from pretrain.transfer.kinds.registry import (
    Found,
    Kind,
    Metric,
    detect,
    label_index,
    lookup,
    register,
    registered_names,
    score,
    values_metric,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # registers every kind
    importlib.import_module(f"{__name__}.{_module}")
del _module

__all__ = ["Found", "Kind", "Metric", "detect", "label_index", "lookup", "register", "registered_names", "score",
           "values_metric"]
