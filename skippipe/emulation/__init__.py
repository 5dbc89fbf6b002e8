"""The emulated cluster: network namespaces and shaping, in-process link latency, the emulated run and its
report, and the chaos run. Built on the runtime; the runtime never imports it (tests/test_layering.py)."""
