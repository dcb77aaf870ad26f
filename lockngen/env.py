"""Reading typed values out of the environment, with one-line errors.

Imports nothing from Django but its exception class, so ``gunicorn.conf.py``
can use it before (and without) Django settings.
"""

from __future__ import annotations

from collections.abc import Mapping

from django.core.exceptions import ImproperlyConfigured

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ImproperlyConfigured):
    """A configuration mistake reported to operators as one line, no traceback."""


def env_int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int = 0
) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_list(env: Mapping[str, str], name: str, default: str = "") -> list[str]:
    """A comma-separated list, blanks dropped."""
    return [item.strip() for item in env.get(name, default).split(",") if item.strip()]


def env_seconds_list(env: Mapping[str, str], name: str, default: str) -> list[float]:
    """A comma-separated list of non-negative durations in seconds."""
    raw = env.get(name, "").strip() or default
    values: list[float] = []
    for item in raw.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(
                f"{name} must be a comma list of seconds, got {raw!r}"
            ) from None
        if not 0 <= value < float("inf"):
            raise ConfigError(f"{name} must hold seconds >= 0, got {item.strip()!r}")
        values.append(value)
    return values
