"""Untrained embedding rows: detection, unbiased mean, row writes."""
