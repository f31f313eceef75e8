"""The client library: how a pageserver asks the daemon for pages (docs/client-protocol.md)."""

from walredod.client.client import AsyncRedoClient, RedoClient

__all__ = ["AsyncRedoClient", "RedoClient"]
