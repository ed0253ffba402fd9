"""Dataset readers, one per on-disk format, and the download code they share."""
