"""Conformance suites that every implementation of a torpor contract must pass.

A driver's test module subclasses the suite's base class and provides its fixtures (fsspec's
``tests/abstract`` style); the base class holds every test, so all drivers are held to the same
behaviour. Nothing here is collected on its own (no ``test_*`` modules, no ``Test*`` classes).
"""
