"""Benchmarks, each a module with `main(argv)` run by `munet bench <name>`.

Kept free of heavy imports: `munet.bench.serve` spawns load-generating client processes that import
this package and must start quickly.
"""
