"""Benchmarks: effect reproduction on Fashion-MNIST and overhead against the anchors."""
