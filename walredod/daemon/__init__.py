"""The daemon: a supervisor (control plane) and N workers, each managing one redo engine.

``supervisor`` starts, watches and restarts workers and answers the control requests; ``worker`` serves requests
with its engine; ``routing`` ranks workers for a relation; ``metrics`` exports Prometheus metrics.
"""
