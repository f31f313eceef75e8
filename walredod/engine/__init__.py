"""The redo engine: PostgreSQL child processes that replay WAL records onto one page.

``RedoEngine`` is the public entry point; ``pipe`` encodes the child protocol, ``child`` runs one process,
``datadir`` prepares what a child needs.
"""

from walredod.engine.engine import EngineStats, RedoEngine

__all__ = ["EngineStats", "RedoEngine"]
