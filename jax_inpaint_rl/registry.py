"""Names -> objects for the pluggable parts (model families, algorithms): a table of "module:attribute"
strings imported on first use, and any "module:attribute" a config names directly."""
import importlib
from typing import Any, Mapping


def resolve(name: str, table: Mapping[str, str], field: str) -> Any:
    """The object `table[name]` points to, or `name` itself read as "module:attribute"; `field` names the
    config field in errors."""
    spec = table.get(name, name)
    if ":" not in spec:
        raise ValueError(f"config: {field}={name!r}: expected one of {sorted(table)} or 'module:attribute'")
    module, attr = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"config: {field}={name!r}: cannot import {spec} ({error})") from error
