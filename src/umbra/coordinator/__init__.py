"""The shadow copy coordinator: runs a snapshot set through its phases with timeouts, all or none.

May import ``providers``, ``writers`` and ``volume``; never ``repo``, ``engine`` or ``cli``.
"""
