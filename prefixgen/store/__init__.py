"""Every byte on disk, both directions: the writer, the reader (`PrefixStore`), the index and the block cache."""
