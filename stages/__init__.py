import storage  # noqa: F401  (first: storage/__init__.py fixes the thread runtimes before torch loads)
