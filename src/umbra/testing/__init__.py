"""Test helpers shipped with the package: generated volumes and fault injection.

Only tests (and a future ``umbra debug`` command) import this package; import-linter enforces it.
"""
