"""Raw API keys: generate, derive the prefix, hash, validate. No ORM here.

Format: ``lk_`` + 8 alphanumerics + ``_`` + a secret of at least 32 URL-safe
characters (``secrets.token_urlsafe(32)`` gives 43 characters, 256 bits).
Keys carry that much entropy, so one fast SHA-256 is the right hash: a slow
password hash would only make every request slower, not a key guessable.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string

PREFIX_MARK = "lk_"
PREFIX_LENGTH = 11  # "lk_" + 8 alphanumerics
HASH_LENGTH = 64
KEY_PATTERN = re.compile(r"\Alk_[A-Za-z0-9]{8}_[A-Za-z0-9_-]{32,}\Z")
MAX_KEY_LENGTH = 256

_ALPHANUMERIC = string.ascii_letters + string.digits


def generate_key() -> str:
    """A fresh raw key; shown to its owner once and never stored."""
    public = "".join(secrets.choice(_ALPHANUMERIC) for _ in range(8))
    return f"{PREFIX_MARK}{public}_{secrets.token_urlsafe(32)}"


def is_valid_format(raw_key: str) -> bool:
    return len(raw_key) <= MAX_KEY_LENGTH and bool(KEY_PATTERN.match(raw_key))


def key_prefix(raw_key: str) -> str:
    return raw_key[:PREFIX_LENGTH]


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


# The documented development key (README). Seeded only in development and
# refused by authentication in production even if a database still holds it.
DEFAULT_DEV_API_KEY = "lk_devkey00_insecure-development-key-do-not-deploy"
