"""NNX model families, their checkpoint loaders and the short-name registry."""
