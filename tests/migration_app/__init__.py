"""Test-only app whose migrations drop and rename what earlier ones created.

Installed only in subprocesses of tests/test_migration_script.py through
``LOCKNGEN_EXTRA_APPS=tests.migration_app``; it never creates tables otherwise.
"""
