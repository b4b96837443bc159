"""Benchmarks, each a module with `main(argv)` run by `munet bench <name>` from a checkout (or
`python -m benchmarks.<name>` at the repository root). Not part of the installed package.

Kept free of heavy imports: `benchmarks.serve_load`'s spawned client processes import this package and
must start quickly.
"""
