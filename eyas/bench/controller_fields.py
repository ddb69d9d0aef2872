"""ControllerConfig fields from the bench scripts' command lines: `key=value` items, values an
int, a float, True or False (`bench/paired_steps.py` modes, `bench/controller_sim.py --set`)."""
from __future__ import annotations

import dataclasses

from eyas.errors import ConfigError
from eyas.spec.controller import ControllerConfig


def parse_value(value: str):
    """'True'/'False' -> bool, '12' / '-3' -> int, anything else -> float (ValueError if not one)."""
    if value in ("True", "False"):
        return value == "True"
    return int(value) if value.lstrip("-").isdigit() else float(value)


def controller_fields(items: list[str], where: str) -> dict:
    """{field: value} for `key=value` items, checked by ControllerConfig's own rules before any
    engine is built; `where` names the source in the errors (ConfigError)."""
    names = {f.name for f in dataclasses.fields(ControllerConfig)}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in names or key == "max_tokens":
            raise ConfigError(f"{where}: {item!r} is not a ControllerConfig setting "
                              f"(expected key=value, key one of {', '.join(sorted(names))})")
        try:
            out[key] = parse_value(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}={value!r} is not a number or True/False") from None
    ControllerConfig(max_tokens=1, **out)
    return out
