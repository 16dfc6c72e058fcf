"""Dispatchers: one interface, one module per transport."""
