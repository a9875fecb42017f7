"""Writers: applications that freeze and thaw around a snapshot set, declare their files, and hear
when the backup is complete.  May import ``volume``; never ``repo`` or anything above."""
