"""The data plane: large tensors point to point over UCX."""
