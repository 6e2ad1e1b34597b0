#!/usr/bin/env python3
"""A FUSE file system whose reads hang, for lifeboat's tests: a hung NFS or FUSE mount, as a
backup meets it on a real instance.

  ok.txt     a small file that reads normally
  hung.db    a 256 MiB file: the first MiB reads normally, then every read blocks until the file
             system is unmounted

Usage: hangfs.py MOUNTPOINT   (foreground; unmount with `umount -l MOUNTPOINT`)
"""
import errno
import stat
import sys
import threading

from fuse import FUSE, Operations

OK = b"this file reads normally\n"
HUNG_SIZE = 256 << 20
HANG_FROM = 1 << 20
FOREVER = threading.Event()


class HangFs(Operations):
    def getattr(self, path, fh=None):
        if path == "/":
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
        if path == "/ok.txt":
            return dict(st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=len(OK), st_blocks=1)
        if path == "/hung.db":
            # As many blocks as bytes: a dense file, read in full.
            return dict(st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=HUNG_SIZE,
                        st_blocks=HUNG_SIZE // 512)
        raise OSError(errno.ENOENT, path)

    def readdir(self, path, fh):
        return [".", "..", "hung.db", "ok.txt"]

    def read(self, path, size, offset, fh):
        if path == "/ok.txt":
            return OK[offset:offset + size]
        if offset + size > HANG_FROM:
            FOREVER.wait()
        return b"\x42" * size


if __name__ == "__main__":
    FUSE(HangFs(), sys.argv[1], foreground=True, nothreads=False, ro=True)
