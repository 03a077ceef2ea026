"""Blueprints: public runs and status, internal runner, health."""
