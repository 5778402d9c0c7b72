"""A backup end to end: the run, its checks, backup URLs and verification."""
