"""Dagster wiring for MAEMI-Ops: each asset calls into ``maemi_core``; nothing else lives here."""
