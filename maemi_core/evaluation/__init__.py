"""Metrics and the tables built from them."""
