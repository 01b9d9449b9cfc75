"""Benchmarks: commands that print numbers (prefill of the pruning hooks, the search's cost, the read side)."""

__all__ = ["pruning", "read", "search", "shapes"]  # bench-* commands; the shapes of bench-pruning
