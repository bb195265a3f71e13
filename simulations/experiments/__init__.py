"""The lab: benchmarks, studies and load tests, and their results document (``RESULTS.md``).

Nothing in the product (``shared``, ``server``, ``client`` and the product commands in
``simulations``) imports from here; ``tests/test_architecture.py`` checks it. The commands
stay reachable from ``storefed`` through the one registry in ``simulations/cli.py``.
"""
