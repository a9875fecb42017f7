"""Copy-on-write snapshots, changed-block tracking and the CDP journal of protected volumes."""
