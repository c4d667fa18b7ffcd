"""Unit tests of the step's math (geolora.integrator), in float64 against tests/reference.py."""
