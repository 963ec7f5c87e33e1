"""Triton Inference Server support: finding or installing the server and its model environment."""
