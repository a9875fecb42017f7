"""Snapshot providers: one interface (probe, prepare, commit, release, delete), a registry, and
selection in priority order hardware > software > system.  May import ``volume``; never ``repo``
or anything above.  A provider whose tools are missing is listed as unavailable, with the reason.
"""
