"""Backup and restore pipelines (threads over GIL-releasing libraries) and their progress events.

May import ``repo`` and ``volume``; never ``cli``.
"""
