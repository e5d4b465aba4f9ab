"""Config-file variants: the `key=value,...` argument after the colon of `--config=file.py:...`."""

from __future__ import annotations

from collections.abc import Mapping


def parse(arg: str | None, defaults: Mapping[str, str]) -> dict[str, str]:
    """'a=1,b=2' -> the defaults updated with those values; a key the file does not
    have, or a part that is not key=value, is an error naming the valid keys."""
    variants = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in defaults:
            raise ValueError(f"config variant {part!r} in {arg!r} is not one of "
                             f"{', '.join(k + '=...' for k in defaults)}")
        variants[key.strip()] = value.strip()
    return variants
