"""Tooling around the library and the daemon: the ``walredod`` command line and the benchmark driver."""
