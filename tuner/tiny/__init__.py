"""The embedded default model: its recipe as plain data, the builder and the seeded training on `dart_shapes`."""

__all__ = ["model", "recipe", "train"]
