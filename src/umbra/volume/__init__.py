"""Block sources and sinks: image files and block devices, geometry, used-block maps.

The lowest layer: imports nothing else of umbra but ``umbra.errors``.  Main types:
:class:`~umbra.volume.source.FileSource`, :class:`~umbra.volume.usedmap.UsedMap`,
:class:`~umbra.volume.sink.Target`.
"""
