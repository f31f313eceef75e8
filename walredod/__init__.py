"""walredod: a WAL redo daemon for disaggregated PostgreSQL storage."""

__version__ = "0.1.0"
