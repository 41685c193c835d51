"""How the LLM tools get a client: a model name plus ``client_kwargs``, or a :class:`ChatClient`.

Also accepts, for one release, the 0.1 keywords that built the client inside the tools
(``base_url=``, ``cache_dir=``, …), folding them into ``client_kwargs`` with a FutureWarning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from sc_llm._deprecations import shim, warn_deprecated

from ._client import ChatClient, with_temperature

F = TypeVar("F", bound=Callable[..., Any])

#: client_kwargs that also apply to a ChatClient passed as the model: they change this call's requests
#: or its cost summary, not the client.
PER_CALL = ("temperature", "params", "price_per_1m_tokens")
#: The 0.1 keywords of llm_annotate / llm_marker_matching that now go into client_kwargs.
LEGACY_CLIENT_KEYWORDS = (
    "base_url", "api_key", "api_key_env", "temperature", "params",
    "max_concurrency", "timeout", "max_retries", "cache_dir", "price_per_1m_tokens",
)  # fmt: skip
_CLIENT_FIELDS = frozenset(f.name for f in dataclasses.fields(ChatClient) if f.init and f.name != "model")


@dataclasses.dataclass
class ClientCall:
    """The client one tool call uses, the request fields it adds, and the token prices of its summary."""

    client: ChatClient
    params: dict[str, Any]
    price_per_1m_tokens: tuple[float, float] | None


@contextlib.contextmanager
def open_client(model: str | ChatClient, client_kwargs: Mapping[str, Any] | None) -> Iterator[ClientCall]:
    """Use the caller's :class:`ChatClient` as is, or build one for a model name and close it after."""
    kwargs = dict(client_kwargs or {})
    if unknown := sorted(set(kwargs) - _CLIENT_FIELDS):
        raise TypeError(
            f"client_kwargs has keys that ChatClient does not take: {unknown}; it takes {sorted(_CLIENT_FIELDS)}."
        )
    if isinstance(model, ChatClient):
        if building := sorted(set(kwargs) - set(PER_CALL)):
            raise ValueError(
                f"client_kwargs {building} configure a new client, but `model` is a ChatClient: set them "
                f"when building it (ChatClient(..., {building[0]}=…)) or pass the model's name instead."
            )
        params = with_temperature(kwargs.get("params"), kwargs.get("temperature"))
        yield ClientCall(model, params, kwargs.get("price_per_1m_tokens", model.price_per_1m_tokens))
        return
    if not isinstance(model, str):
        raise TypeError(f"model must be a model name or a ChatClient, got {type(model).__name__}.")
    client = ChatClient(model, **kwargs)
    try:
        yield ClientCall(client, {}, client.price_per_1m_tokens)
    finally:
        client.close()


def client_keywords_moved() -> Callable[[F], F]:
    """Accept the 0.1 client keywords (:data:`LEGACY_CLIENT_KEYWORDS`) as ``client_kwargs`` entries.

    As in 0.1, the keywords that build a client are ignored when ``model`` is a :class:`ChatClient`;
    ``temperature`` and ``params`` are merged with ``params`` winning, as 0.1 did.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        @shim
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            moved = {name: kwargs.pop(name) for name in LEGACY_CLIENT_KEYWORDS if name in kwargs}
            if moved:
                spelled = ", ".join(f"{k!r}: …" for k in moved)
                instead = f"`client_kwargs={{{spelled}}}` (or a ChatClient as `model`)"
                warn_deprecated(fn, "/".join(moved), instead)
                kwargs["client_kwargs"] = _fold(signature.bind_partial(*args, **kwargs).arguments, moved)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _fold(arguments: Mapping[str, Any], moved: dict[str, Any]) -> dict[str, Any]:
    given = dict(arguments.get("client_kwargs") or {})
    if both := sorted(set(given) & set(moved)):
        raise TypeError(
            f"{both} given both as keywords (deprecated) and in client_kwargs; pass them in client_kwargs."
        )
    if isinstance(arguments.get("model"), ChatClient):
        moved = {k: v for k, v in moved.items() if k in PER_CALL}
    params = moved.get("params")
    if moved.get("temperature") is not None and isinstance(params, Mapping) and "temperature" in params:
        del moved["temperature"]  # 0.1 sent params' temperature when both were given
    return {**given, **moved}
