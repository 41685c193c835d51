"""How the LLM tools get a client: a model name plus ``client_kwargs``, or a :class:`ChatClient`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from ._client import ChatClient, with_temperature

#: client_kwargs that also apply to a ChatClient passed as the model: they change this call's requests
#: or its cost summary, not the client.
PER_CALL = ("temperature", "params", "price_per_1m_tokens")
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
