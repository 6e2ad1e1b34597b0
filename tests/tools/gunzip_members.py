#!/usr/bin/env python3
"""gunzip for lifeboat's archives in tests: decompresses a stream of gzip members to stdout,
checking each member's CRC and size as zlib does, but decompressing a member whose bytes equal
the previous member's only once. lifeboat stores a run of zeros (the rest of a huge file cut at a
deadline) as one precomputed member repeated; GNU gzip would take minutes to inflate the 24 GiB
such a test archive declares, this takes seconds.

Usage: gunzip_members.py FILE | tar -tvf -
"""
import sys
import zlib


def main():
    data = memoryview(open(sys.argv[1], "rb").read())
    out = sys.stdout.buffer
    last_member, last_output = None, None
    pos = 0
    while pos < len(data):
        if last_member is not None and data[pos:pos + len(last_member)] == last_member:
            out.write(last_output)
            pos += len(last_member)
            continue
        d = zlib.decompressobj(31)  # gzip wrapper: header, CRC-32 and ISIZE are checked
        output = d.decompress(data[pos:])
        if not d.eof:
            sys.exit("gunzip_members: truncated gzip member at byte %d" % pos)
        used = len(data) - pos - len(d.unused_data)
        last_member, last_output = bytes(data[pos:pos + used]), output
        out.write(output)
        pos += used


if __name__ == "__main__":
    main()
