"""Test harnesses shared by the tests, the quickstart and the benchmarks: a whole farm on this machine."""
