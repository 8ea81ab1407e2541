"""Defenses: each wraps a frozen victim classifier."""
