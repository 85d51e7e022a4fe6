"""tritium's benchmarks: `python -m benchmarks run` measures suites of operators against
other backends and writes results.json, results.csv, README.md and plots to reports/.

Nothing here imports triton at package import: on a machine without CUDA, `__main__` must
set TRITON_INTERPRET=1 before triton is first imported.
"""
