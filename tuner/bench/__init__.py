"""Benchmarks: commands that print numbers (prefill of the pruning hooks, the search's cost, the read side, serving)."""

__all__ = ["pruning", "read", "search", "serving", "shapes"]  # a module per bench-* command; bench-pruning's shapes
