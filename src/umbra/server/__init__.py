"""The network backup server (``umbra serve``): repositories kept for many clients, each opened
only by its own tokens.  May import ``repo``; never ``cli``."""
