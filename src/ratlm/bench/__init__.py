"""Benchmarks run on a GPU machine (`ratlm bench ...`); each writes JSON lines under $OUT."""
