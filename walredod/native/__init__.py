"""Redo in Python, without postgres: transaction status (pg_xact), MultiXacts, relation maps, two-phase state and
visibility-map bits — what PostgreSQL's own redo changes outside relation pages or as a side effect of heap
records. Byte for byte as PostgreSQL 15 would."""
