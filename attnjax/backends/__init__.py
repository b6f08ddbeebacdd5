"""Attention backends. Each module defines one backend and declares its capabilities."""
