"""Where API keys come from, in one place: an environment variable or a Prefect Secret block.

A stage config never holds a key, only where to find it: `api_key_env` (the NAME of an
environment variable) or `api_key_block` (the NAME of a Prefect Secret block), never both.
The key is read on the process that makes the requests (the Ray actor of the stage), when the
stage loads, and lives there in a `SecretValue`: no repr, str, log line, exception or pickle
shows it, and configs, reprs and a row's `params` carry only the names.

Create a block once per Prefect server (or workspace), in the UI (Blocks -> Secret, or
`prefect block create secret`, which prints the page) or in Python:

    from prefect.blocks.system import Secret
    Secret(value="sk-...").save("vlm-api-key")

The process reading the block must reach the Prefect API that holds it (PREFECT_API_URL, and
PREFECT_API_KEY for Prefect Cloud, in its environment).
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Prefect's own rule for block document names (lowercase letters, digits and dashes).
BLOCK_NAME = re.compile(r"^[a-z0-9-]+$")
MAX_BLOCK_NAME = 100


class SecretValue:
    """A value that shows itself in no repr, str, log line or pickle; `reveal()` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str, mask: str = "[redacted]") -> str:
        """`text` with every occurrence of the value replaced by `mask` (for server answers
        that might echo the key back into an error message)."""
        return text.replace(self._value, mask) if self._value else text

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "SecretValue('***')"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError(
            "a secret is not pickled; it is read (from its environment variable or Prefect "
            "Secret block) on the process that uses it"
        )


class ApiKeyUnavailableError(RuntimeError):
    """The configured key source cannot give a key (missing block, unreachable API, ...)."""


def check_key_source(
    env_name: str | None,
    block_name: str | None,
    env_field: str = "api_key_env",
    block_field: str = "api_key_block",
) -> None:
    """Raise ValueError unless the config names at most one key source, each well formed.

    The messages never echo the offending value: a key pasted into the wrong field must not
    end up in a log.
    """
    if env_name is not None and block_name is not None:
        raise ValueError(
            f"name either {env_field} (an environment variable) or {block_field} (a Prefect "
            "Secret block) for the API key, not both"
        )
    if env_name is not None and not (isinstance(env_name, str) and ENV_NAME.match(env_name)):
        raise ValueError(
            f"{env_field} must be the NAME of an environment variable (letters, digits and "
            "underscores), not the key itself"
        )
    if block_name is not None:
        if not (
            isinstance(block_name, str)
            and BLOCK_NAME.match(block_name)
            and len(block_name) <= MAX_BLOCK_NAME
        ):
            raise ValueError(
                f"{block_field} must be the NAME of a Prefect Secret block (lowercase letters, "
                f"digits and dashes, at most {MAX_BLOCK_NAME} characters), not the key itself"
            )
        if block_name.startswith("sk-"):
            # Lowercase keys of the form sk-... pass the name rule; refuse them before the name
            # is recorded in a row's params or printed in a "block not found" error.
            raise ValueError(
                f"{block_field} looks like an API key (sk-...); give the NAME of the Prefect "
                "Secret block that holds the key"
            )


def describe_key_source(env_name: str | None, block_name: str | None) -> str:
    """Where the key comes from, for messages: never the key itself."""
    if block_name is not None:
        return f"Prefect Secret block {block_name!r}"
    if env_name is not None:
        return f"${env_name}"
    return "no API key"


def resolve_api_key(env_name: str | None, block_name: str | None, what: str) -> SecretValue | None:
    """The key from the configured source, read now, in this process; None when the config
    names no source.

    An environment variable that is unset or empty gives an empty `SecretValue` (the caller
    decides whether that is an error). A block that is missing, empty, not a string, or
    behind an unreachable Prefect API raises `ApiKeyUnavailableError` naming the block, the
    API asked and how to create the block; `what` says who needs the key (e.g. "stylize
    (http backend)").
    """
    check_key_source(env_name, block_name)
    if block_name is not None:
        return SecretValue(_read_block(block_name, what))
    if env_name is not None:
        return SecretValue(os.environ.get(env_name) or "")
    return None


def _read_block(name: str, what: str) -> str:
    import httpx
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    api = _prefect_api()
    how = (
        f"create it with `prefect block create secret` (then name it {name!r} in the UI) or in "
        f"Python: from prefect.blocks.system import Secret; Secret(value=...).save({name!r})"
    )
    try:
        # _sync: a stage may load inside a running event loop, where load() would otherwise
        # hand back a coroutine.
        block = Secret.load(name, _sync=True)
    except ValueError as error:
        if isinstance(error.__cause__, ObjectNotFound) or "Unable to find" in str(error):
            raise ApiKeyUnavailableError(
                f"{what}: the Prefect Secret block {name!r} does not exist on {api}; {how}"
            ) from None
        # Anything else (a block whose data does not validate, ...) is reported by type only:
        # a validation message may quote the stored value.
        raise ApiKeyUnavailableError(
            f"{what}: cannot load the Prefect Secret block {name!r} from {api} "
            f"({type(error).__name__})"
        ) from None
    except httpx.HTTPStatusError as error:
        raise ApiKeyUnavailableError(
            f"{what}: the Prefect API at {api} answered HTTP {error.response.status_code} when "
            f"asked for the Secret block {name!r} (for Prefect Cloud, check PREFECT_API_KEY)"
        ) from None
    except (httpx.HTTPError, OSError, RuntimeError) as error:
        raise ApiKeyUnavailableError(
            f"{what}: cannot read the Prefect Secret block {name!r}: the Prefect API at {api} "
            f"is unreachable ({type(error).__name__}); set PREFECT_API_URL to the server that "
            "holds the block"
        ) from None
    value = block.value.get_secret_value()
    # Not block.get(): it JSON-decodes, which would turn a key such as "12345" into an int.
    if not isinstance(value, str):
        raise ApiKeyUnavailableError(
            f"{what}: the Prefect Secret block {name!r} holds a {type(value).__name__}, "
            "expected the API key as a string"
        )
    if not value:
        raise ApiKeyUnavailableError(f"{what}: the Prefect Secret block {name!r} is empty")
    return value


def _prefect_api() -> str:
    """The Prefect API this process talks to, for messages (without any credentials)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return "the local ephemeral Prefect server (PREFECT_API_URL is not set)"
    return without_credentials(url)


def without_credentials(url: str) -> str:
    """`url` with no user, password, query or fragment: safe to log or hand to a worker."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
