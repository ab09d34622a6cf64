"""Compatibility layers for code written against other sandbox SDKs."""
