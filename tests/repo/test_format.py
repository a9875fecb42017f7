import blake3

from umbra.repo import format as fmt


def test_magics_are_frozen() -> None:
    assert blake3.blake3(b"umbra pack v1").digest()[:8] == fmt.PACK_MAGIC
    assert fmt.PACK_MAGIC.hex() == blake3.blake3(b"umbra pack v1").hexdigest()[:16]
    # frozen literals: changing them breaks every existing repository
    assert (fmt.PACK_MAGIC.hex(), fmt.INDEX_MAGIC.hex(), fmt.TREE_MAGIC.hex()) == FROZEN


FROZEN = (
    blake3.blake3(b"umbra pack v1").hexdigest()[:16],
    blake3.blake3(b"umbra index v1").hexdigest()[:16],
    blake3.blake3(b"umbra tree v1").hexdigest()[:16],
)


def test_struct_sizes() -> None:
    assert fmt.ENVELOPE_HEADER.size == 1 + 16 + 12
    assert fmt.PACK_FOOTER.size == 12
    assert fmt.PACK_ENTRY.size == 1 + 32 + 4 + 4
    assert fmt.INDEX_PACK.size == 36
    assert fmt.TREE_HEADER.size == 13
    assert fmt.FORMAT_VERSION == 1
