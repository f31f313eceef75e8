"""The client library: how a pageserver asks the daemon for pages (docs/client-protocol.md)."""

from walredod.client.client import AsyncRedoClient, RedoClient
from walredod.client.links import CurveKeys

__all__ = ["AsyncRedoClient", "CurveKeys", "RedoClient"]
