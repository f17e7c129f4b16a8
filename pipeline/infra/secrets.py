"""Credentials never belong in the config: it is written to ``_config.yaml`` next to the output.

``find_credentials`` finds them anywhere in a config tree (keys that name a credential, URLs
with a user or password, values shaped like well-known access keys); ``redact`` hides such
values in a message before it is printed.
"""

from __future__ import annotations

import re
from typing import Any, Iterator
from urllib.parse import urlsplit

#: Words that make a key name a credential (``HF_TOKEN``, ``aws_secret_access_key``, ``password``).
CREDENTIAL_WORDS = frozenset({"token", "secret", "password", "passwd", "credential", "credentials",
                              "apikey", "authorization", "bearer", "cookie"})
#: ``key`` is a credential alone or after these words (``key``, ``api_key``, ``AWS_ACCESS_KEY_ID``).
KEY_QUALIFIERS = frozenset({"api", "access", "secret", "private", "auth", "account", "signing", "master"})

#: Values shaped like well-known credentials: AWS access key ids, Hugging Face, GitHub and
#: OpenAI-style tokens, PEM private keys.
SECRET_VALUE = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bhf_[A-Za-z0-9]{30,}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bsk-[A-Za-z0-9_-]{20,}\b"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----")
#: ``scheme://user:password@host``: the user info part of a URL.
URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")

WHERE_CREDENTIALS_BELONG = (
    "credentials never go in the config (it is written to _config.yaml next to the output): S3 credentials "
    "come from the standard AWS chain (AWS_* environment variables, a profile, an instance role), a "
    "Hugging Face token from HF_TOKEN in the environment of the driver and the Ray workers")


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)  # camelCase -> camel_Case
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def is_credential_key(name: str) -> bool:
    """Whether a key's name says it holds a credential."""
    words = _words(name)
    if CREDENTIAL_WORDS.intersection(words):
        return True
    return any(w == "key" and (len(words) == 1 or (i > 0 and words[i - 1] in KEY_QUALIFIERS))
               for i, w in enumerate(words))


def credential_in_value(value: str) -> str | None:
    """Why a string value holds a credential (a URL with a user or password, or a well-known
    key shape), or None."""
    if URL_USERINFO.search(value):
        return "a URL with a user name or password"
    try:
        if "@" in (urlsplit(value).netloc or ""):
            return "a URL with a user name or password"
    except ValueError:
        pass
    if SECRET_VALUE.search(value):
        return "a value shaped like an access key or token"
    return None


def find_credentials(tree: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, why) for every credential in a nested config tree of dicts and lists."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if is_credential_key(str(key)) and value not in (None, "", {}, []):
                yield path, "its name says it holds a credential"
            else:
                yield from find_credentials(value, path + ".")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from find_credentials(value, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(tree, str):
        why = credential_in_value(tree)
        if why:
            yield prefix.rstrip("."), f"it holds {why}"


def redact(text: str) -> str:
    """``text`` with URL user info and credential-shaped values replaced by ``***``."""
    text = URL_USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
    return SECRET_VALUE.sub("***", text)
