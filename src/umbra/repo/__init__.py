"""The repository: object model, packs, index, volume trees, manifests, keys, locks, check, prune.

May import ``umbra.volume`` (below it) but never ``engine`` or ``cli``.  Main types:
:class:`~umbra.repo.repository.Repository`, :class:`~umbra.repo.manifest.Point`,
:class:`~umbra.repo.writer.BlobWriter`, :class:`~umbra.repo.tree.TreeReader`.
"""
