#!/usr/bin/env python3
"""Builds a corpus of tar archives as other tools write them, for restore's compatibility test.

    tar_corpus.py OUTDIR

Writes OUTDIR/src (the tree archived) and OUTDIR/NAME.tar for each archive, and prints the
archive names, one per line. The writers: GNU tar in each of its formats (gnu, oldgnu, posix,
ustar, v7), with GNU sparse files in each sparse version (old GNU, pax 0.0, 0.1 and 1.0), a volume
label, base-256 numeric fields (a uid over 8^7, a time before 1970); bsdtar in its formats; and
Python's tarfile in GNU, PAX (with and without a global header) and USTAR format; plus
hand-made cases tools write in the wild (redundant long-name headers, a pax global header that
sets a field). A writer that cannot represent the tree (v7 and long names, say) is given the
subset it can; an archive its own writer fails on is left out.
"""

import io
import os
import shutil
import subprocess
import sys
import tarfile

MTIME = 1_600_000_000


def build_tree(src, full=True):
    """A tree with what real servers hold; `full=False` leaves out what old formats lack."""
    os.makedirs(os.path.join(src, "etc", "app"), exist_ok=True)
    os.makedirs(os.path.join(src, "empty-dir"), exist_ok=True)

    def put(rel, data, mode=0o644):
        path = os.path.join(src, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        os.utime(path, (MTIME, MTIME))

    put("etc/app/config.ini", b"[app]\nkey = value\n", 0o640)
    put("etc/app/run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    put("empty.txt", b"")
    put("with space.txt", b"spaces\n")
    put("binary.bin", bytes(range(256)) * 64)
    os.symlink("etc/app/config.ini", os.path.join(src, "config-link"))
    os.symlink("/etc/hostname", os.path.join(src, "absolute-link"))
    os.symlink("../../nowhere", os.path.join(src, "etc", "dangling-link"))
    os.link(os.path.join(src, "etc/app/config.ini"), os.path.join(src, "config-hard"))
    if full:
        deep = os.path.join("long-" + "d" * 60, "e" * 60)
        put(os.path.join(deep, "f" * 80 + ".txt"), b"long name\n")
        os.symlink("t" * 120, os.path.join(src, "long-target-link"))
        put(b"caf\xe9-latin1.txt".decode("utf-8", "surrogateescape"), b"latin1 name\n")
        put("old.txt", b"before 1970\n")
        os.utime(os.path.join(src, "old.txt"), (-86400 * 400, -86400 * 400))
        # Sparse: data at the start, at 1 MiB and at the end of 4 MiB.
        path = os.path.join(src, "sparse.img")
        with open(path, "wb") as f:
            f.write(b"head" * 1024)
            f.seek(1 << 20)
            f.write(b"middle" * 1000)
            f.truncate(4 << 20)
            f.seek((4 << 20) - 5)
            f.write(b"tail\n")
        os.utime(path, (MTIME, MTIME))
    for d in ["etc/app", "etc", "empty-dir"]:
        os.utime(os.path.join(src, d), (MTIME, MTIME))
    os.chmod(os.path.join(src, "etc", "app"), 0o750)


def main():
    out = sys.argv[1]
    src = os.path.join(out, "src")
    small = os.path.join(out, "src-small")
    for d, full in [(src, True), (small, False)]:
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        build_tree(d, full)
    names = []

    def run(name, argv):
        path = os.path.join(out, name + ".tar")
        r = subprocess.run(argv + [path] if "{out}" not in argv else
                           [a.replace("{out}", path) for a in argv],
                           capture_output=True)
        if r.returncode == 0 and os.path.exists(path):
            names.append(name)

    gnu = ["tar", "--numeric-owner", "--owner=+1000", "--group=+1000"]
    for fmt in ["gnu", "oldgnu", "posix", "ustar"]:
        tree = src if fmt in ("gnu", "oldgnu", "posix") else small
        run(f"gnutar-{fmt}", gnu + [f"--format={fmt}", "-C", tree, "-cf", "{out}", "."])
        run(f"gnutar-{fmt}-noprefix", gnu + [f"--format={fmt}", "-C", tree, "-cf", "{out}",
                                              "etc", "empty.txt", "config-link", "config-hard"])
    run("gnutar-v7", gnu + ["--format=v7", "-C", small, "-cf", "{out}", "etc", "empty.txt",
                            "with space.txt", "config-link", "config-hard", "empty-dir"])
    run("gnutar-gnu-sparse", gnu + ["--format=gnu", "--sparse", "-C", src, "-cf", "{out}", "."])
    for v in ["0.0", "0.1", "1.0"]:
        run(f"gnutar-pax-sparse-{v}", gnu + ["--format=posix", "--sparse", f"--sparse-version={v}",
                                            "-C", src, "-cf", "{out}", "sparse.img", "etc"])
    run("gnutar-volume-label", gnu + ["--format=gnu", "-V", "backup volume", "-C", small,
                                      "-cf", "{out}", "."])
    run("gnutar-base256-uid", ["tar", "--numeric-owner", "--owner=+4000000", "--group=+4000000",
                               "--format=gnu", "-C", small, "-cf", "{out}", "."])

    if shutil.which("bsdtar"):
        for fmt in ["pax", "ustar", "gnutar", "v7", "restricted-pax"]:
            tree = src if fmt in ("pax", "gnutar", "restricted-pax") else small
            run(f"bsdtar-{fmt}", ["bsdtar", "--format", fmt, "--uid", "1000", "--gid", "1000",
                                  "-C", tree, "-cf", "{out}", "."])
        run("bsdtar-pax-sparse", ["bsdtar", "--format", "pax", "--read-sparse", "-C", src,
                                  "-cf", "{out}", "sparse.img", "etc"])

    def python_tar(name, fmt, tree, **kw):
        path = os.path.join(out, name + ".tar")
        try:
            with tarfile.open(path, "w", format=fmt, **kw) as t:
                t.add(tree, arcname=".", filter=owned)
            names.append(name)
        except (ValueError, OSError):
            os.unlink(path)

    def owned(info):
        info.uid = info.gid = 1000
        info.uname = info.gname = ""
        return info

    python_tar("python-gnu", tarfile.GNU_FORMAT, src)
    python_tar("python-pax", tarfile.PAX_FORMAT, src)
    python_tar("python-pax-global-comment", tarfile.PAX_FORMAT, src,
               pax_headers={"comment": "made by a test"})
    python_tar("python-pax-global-mtime", tarfile.PAX_FORMAT, small,
               pax_headers={"mtime": "1234567890"})
    python_tar("python-ustar", tarfile.USTAR_FORMAT, small)

    # Two GNU long-name headers in a row before one file (the first is redundant; GNU tar uses
    # the last), as some writers emit when re-archiving.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for n in ["x" * 120, "y" * 130]:
            info = tarfile.TarInfo("././@LongLink")
            info.type = tarfile.GNUTYPE_LONGNAME
            data = n.encode() + b"\0"
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        data = b"redundant\n"
        info = tarfile.TarInfo("short-name")
        info.size, info.mtime, info.mode = len(data), MTIME, 0o644
        t.fileobj.write(info.tobuf(tarfile.USTAR_FORMAT))
        t.fileobj.write(data + b"\0" * (512 - len(data)))
        t.offset += 512 + 512
    with open(os.path.join(out, "handmade-redundant-longname.tar"), "wb") as f:
        f.write(buf.getvalue())
    names.append("handmade-redundant-longname")

    print("\n".join(names))


if __name__ == "__main__":
    main()
