#!/usr/bin/env python3
"""Drops the files under each DIR from the page cache (posix_fadvise DONTNEED on each), so the
next read of them goes to the disk, as on an instance whose data was not read since boot.
Needs no privilege: clean pages of files one can open are dropped. Usage: evict-cache.py DIR..."""
import os
import sys

for top in sys.argv[1:]:
    for root, _dirs, files in os.walk(top):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
