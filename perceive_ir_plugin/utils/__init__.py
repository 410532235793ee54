"""Helpers shared by the plugin's archs, models, data and tools (no registrations)."""
