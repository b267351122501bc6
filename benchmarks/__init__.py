"""Benchmarks (not tests) of the engine against reference code, and their shared harness; never imported by the pack.

Run each from the repository root as a module: `python -m benchmarks.sampling`, `python -m benchmarks.grpo`,
`python -m benchmarks.metaquery` (`--help` lists a benchmark's flags). This file makes `benchmarks` a regular
package, not merged with a namespace package of that name elsewhere.
"""
