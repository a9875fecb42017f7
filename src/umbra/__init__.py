"""umbra: consistent point-in-time copies of live volumes, kept safe."""

__version__ = "0.1.0"
