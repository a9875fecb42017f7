"""Front ends over block views: the NBD server, the FUSE block file, the protect daemon."""
