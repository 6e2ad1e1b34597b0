//! Getting data back safely: restore refuses hostile archives, verify catches corruption.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{
    Imds, Lifeboat, config_for, instance_prefix, moto, root, s3s_fs, wait_output, write,
};

/// A tar with raw, unchecked names (what an attacker would upload).
fn hostile_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let entries: [(&str, tar::EntryType, &[u8], Option<&str>); 7] = [
        ("../escaped.txt", tar::EntryType::Regular, b"x", None),
        (
            "/tmp/lifeboat-absolute.txt",
            tar::EntryType::Regular,
            b"x",
            None,
        ),
        ("up", tar::EntryType::Symlink, b"", Some("..")),
        ("up/through-link.txt", tar::EntryType::Regular, b"x", None),
        ("hard", tar::EntryType::Link, b"", Some("../outside-hard")),
        ("dev", tar::EntryType::Char, b"", None),
        ("fine/kept.txt", tar::EntryType::Regular, b"kept", None),
    ];
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        let raw = h.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            raw.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

#[test]
fn restore_refuses_an_archive_that_tries_to_escape() {
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let bucket = server.bucket("hostile");
    let key = "backups/standalone/attacker/20260101T000000Z-evil.tar.gz";
    server.put(&bucket, key, hostile_tar());
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[dir.path()], "", ""),
    );
    let outer = dir.path().join("outer");
    let target = outer.join("target");
    // Without a manifest it is refused unless asked for; then the entries are checked one by one
    // and, any refused, the whole archive is.
    let out = lb.run(&["restore", "--key", key, "--to", target.to_str().unwrap()]);
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(out.stderr.contains("--force-unverified"), "{out:#?}");
    let out = lb.run(&[
        "restore",
        "--key",
        key,
        "--to",
        target.to_str().unwrap(),
        "--force-unverified",
    ]);
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(out.stderr.contains("NOT VERIFIED"), "{out:#?}");
    for refused in [
        "../escaped.txt",
        "/tmp/lifeboat-absolute.txt",
        "up/through-link.txt",
        "hard",
        "dev",
    ] {
        assert!(
            out.stdout.contains(&format!("  {refused}: ")),
            "{refused} not reported: {out:#?}"
        );
    }
    // Nothing was written outside the target.
    let outside: Vec<_> = fs::read_dir(&outer)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, vec![std::ffi::OsString::from("target")]);
    assert!(!std::path::Path::new("/tmp/lifeboat-absolute.txt").exists());
    // An archive that cannot be restored exactly is not restored at all.
    assert!(out.stderr.contains("nothing was restored"), "{out:#?}");
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
}

#[test]
fn verify_detects_a_corrupted_archive() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for i in 0..20 {
        write(
            &data.join(format!("f{i}.log")),
            format!("line {i}\n").repeat(500).as_bytes(),
        );
    }
    let bucket = server.bucket("corrupt");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[&data], "", ""),
    );
    let key = lb.run(&["backup"]).stored_key();
    assert!(lb.run(&["verify", "--key", &key]).ok().starts_with("OK "));
    let mut bytes = server.get(&bucket, &key);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    server.put(&bucket, &key, bytes);
    let out = lb.run(&["verify", "--key", &key]);
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(out.stdout.starts_with("FAILED"), "{out:#?}");
    assert!(out.stdout.contains("SHA-256"), "{out:#?}");
}

/// A gzip tar with one file owned by uid/gid 12345, mode 4755 (setuid).
fn setuid_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("bin/tool").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o4755);
    h.set_uid(12345);
    h.set_gid(12345);
    h.set_size(4);
    h.set_cksum();
    b.append(&h, &b"tool"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// Run as root (as CI is): a restore applies the archive's owners and setuid bit only with
/// `--same-owner`; without it the file is the restoring user's and the bit is gone (it used to
/// apply both whenever restore ran as root).
#[test]
fn owners_and_setuid_bits_are_applied_only_with_same_owner() {
    use std::os::unix::fs::MetadataExt;
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let bucket = server.bucket("setuid");
    let key = "backups/standalone/i-0123456789abcdef0/20260101T000000Z-manual.tar.gz";
    server.put(&bucket, key, setuid_tar());
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[dir.path()], "", ""),
    );
    let me = rustix::process::geteuid().as_raw();
    let plain = dir.path().join("plain");
    lb.run(&[
        "restore",
        "--key",
        key,
        "--to",
        plain.to_str().unwrap(),
        "--force-unverified",
    ])
    .ok();
    let meta = fs::metadata(plain.join("bin/tool")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (me, 0o755));

    if me == 0 {
        let same = dir.path().join("same");
        lb.run(&[
            "restore",
            "--key",
            key,
            "--to",
            same.to_str().unwrap(),
            "--same-owner",
            "--force-unverified",
        ])
        .ok();
        let meta = fs::metadata(same.join("bin/tool")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (12345, 12345));
        assert_eq!(meta.mode() & 0o7777, 0o4755);
    }
}

/// One byte of a stored archive changed: restore leaves the target exactly as it was and exits
/// non-zero: 3 when the SHA-256 tells (an uncompressed tar, the byte inside file data), 3 or 1
/// for gzip (1 when the stream itself breaks first). (It used to leave 271 of 400 files.)
#[test]
fn a_tampered_archive_leaves_the_target_untouched() {
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for i in 0..400 {
        write(
            &data.join(format!("f{i:03}.log")),
            format!("line {i}\n").repeat(40).as_bytes(),
        );
    }
    for (compression, codes) in [("none", &[3][..]), ("gzip", &[1, 3][..])] {
        let bucket = server.bucket(&format!("tamper-{compression}"));
        let lb = Lifeboat::new(
            dir.path(),
            &server.endpoint,
            &config_for(
                &bucket,
                &[&data],
                &format!("compression = \"{compression}\""),
                "",
            ),
        );
        let key = lb.run(&["backup"]).stored_key();
        let mut bytes = server.get(&bucket, &key);
        // In the plain tar, a byte of file data (only the SHA-256 can tell); in gzip, the middle.
        let at = match compression {
            "none" => bytes.windows(9).position(|w| w == b"line 200\n").unwrap() + 5,
            _ => bytes.len() / 2,
        };
        bytes[at] ^= 0x55;
        server.put(&bucket, &key, bytes);
        let target = dir.path().join(format!("target-{compression}"));
        write(&target.join("already-here.txt"), b"mine\n");
        let out = lb.run(&["restore", "--key", &key, "--to", target.to_str().unwrap()]);
        assert!(
            out.code.is_some_and(|c| codes.contains(&c)),
            "{compression}: {out:#?}"
        );
        let left: Vec<_> = fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("already-here.txt")],
            "{compression}: the target was touched"
        );
        if out.code == Some(3) {
            assert!(
                out.stderr.contains("does not match its manifest"),
                "{out:#?}"
            );
        }
    }
}

/// Restoring over existing files is refused, naming the first one, and nothing is moved in;
/// `--overwrite` replaces them (directories are merged either way).
#[test]
fn restore_refuses_to_replace_existing_files_without_overwrite() {
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.conf"), b"from the backup\n");
    write(&data.join("sub/b.conf"), b"b\n");
    let bucket = server.bucket("overwrite");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[&data], "", ""),
    );
    let key = lb.run(&["backup"]).stored_key();
    let target = dir.path().join("target");
    // The restored tree sits at target/<absolute path of data>.
    let inner = target.join(data.strip_prefix("/").unwrap());
    write(&inner.join("a.conf"), b"local edit\n");
    let out = lb.run(&["restore", "--key", &key, "--to", target.to_str().unwrap()]);
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(
        out.stderr.contains(&format!(
            "{} already exists",
            inner.join("a.conf").display()
        )),
        "{out:#?}"
    );
    assert_eq!(fs::read(inner.join("a.conf")).unwrap(), b"local edit\n");
    assert!(!inner.join("sub").exists(), "something was moved in");
    let names: Vec<_> = fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "staging left behind: {names:?}");

    lb.run(&[
        "restore",
        "--key",
        &key,
        "--to",
        target.to_str().unwrap(),
        "--overwrite",
    ])
    .ok();
    assert_eq!(
        fs::read(inner.join("a.conf")).unwrap(),
        b"from the backup\n"
    );
    assert_eq!(fs::read(inner.join("sub/b.conf")).unwrap(), b"b\n");
}

/// Runs `lifeboat backup` as the instance the emulator `imds` describes; the archive's key.
fn backup_on(lb: &Lifeboat, imds: &Imds) -> String {
    let mut cmd = lb.command(&["backup"]);
    cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint);
    wait_output(cmd.spawn().unwrap(), Duration::from_secs(300), &["backup"]).stored_key()
}

/// An instance files its archives under its instance ARN (what the instance policy's
/// `${ec2:SourceInstanceARN}` lets it write). Another instance's planted archives, in every
/// place that policy lets it write (its own ARN, with anything around it), each with a manifest
/// that claims the victim and matches the archive, are never picked by `restore --instance-id`
/// nor listed as the victim's.
#[test]
fn a_planted_archive_is_not_picked_by_restore_instance_id() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let bucket = server.bucket("planted");
    let (victim, evil) = ("i-0000000000000000a", "i-0000000000000000e");
    let backup_of = |id: &str, text: &[u8]| {
        let data = dir.path().join(format!("data-{id}"));
        write(&data.join("who.txt"), text);
        let lb = Lifeboat::new(
            dir.path(),
            &server.endpoint,
            &config_for(&bucket, &[&data], "", ""),
        );
        let imds = Imds::start(id, "web");
        (backup_on(&lb, &imds), lb)
    };
    let (real, lb) = backup_of(victim, b"the victim's own data\n");
    assert!(real.starts_with(&instance_prefix("web", victim)), "{real}");
    let (evil_key, _) = backup_of(evil, b"planted\n");
    let evil_prefix = instance_prefix("web", evil);
    let victim_arn = instance_prefix("web", victim)["backups/web/".len()..].to_owned();
    let archive = server.get(&bucket, &evil_key);
    let manifest_key = |k: &str| k.replace(".tar.gz", ".manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&server.get(&bucket, &manifest_key(&evil_key))).unwrap();
    let name = "99991231T235959Z-planted.tar.gz";
    for planted in [
        format!("{evil_prefix}{name}"),
        format!("{evil_prefix}x/{victim_arn}{name}"),
        format!(
            "backups/web/{victim}/{}{name}",
            &evil_prefix["backups/web/".len()..]
        ),
        format!(
            "backups/{victim_arn}{}{name}",
            &evil_prefix["backups/".len()..]
        ),
    ] {
        manifest["instance"]["instance_id"] = victim.into();
        manifest["key"] = planted.clone().into();
        server.put(&bucket, &planted, archive.clone());
        server.put(
            &bucket,
            &manifest_key(&planted),
            serde_json::to_vec(&manifest).unwrap(),
        );
    }
    let listed = lb.run(&["list", "--instance-id", victim]);
    assert_eq!(listed.ok().lines().count(), 2, "{listed:#?}");
    assert!(listed.ok().contains(&real), "{listed:#?}");
    let target = dir.path().join("restored");
    lb.run(&[
        "restore",
        "--instance-id",
        victim,
        "--to",
        target.to_str().unwrap(),
    ])
    .ok();
    let data_dir = dir.path().join(format!("data-{victim}"));
    let restored = target
        .join(data_dir.strip_prefix("/").unwrap())
        .join("who.txt");
    assert_eq!(fs::read(restored).unwrap(), b"the victim's own data\n");
}

/// What a tree holds, path by path: kind, mode, mtime, content or link target, and which other
/// paths are the same file (hard links). Directories' mtimes are left out: GNU tar sets one when
/// it leaves the directory in archive order, so when an archive comes back to a directory later
/// (bsdtar lists `etc/app/` after `empty-dir/`), GNU tar's `etc` has the extraction time.
fn tree_of(top: &Path) -> BTreeMap<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(top).min_depth(1).sort_by_file_name() {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(top).unwrap().to_owned();
        let meta = entry.path().symlink_metadata().unwrap();
        let what = if meta.is_dir() {
            "dir".to_owned()
        } else if meta.file_type().is_symlink() {
            format!("symlink -> {:?}", fs::read_link(entry.path()).unwrap())
        } else {
            inodes.entry(meta.ino()).or_default().push(rel.clone());
            let data = fs::read(entry.path()).unwrap();
            let sum: u64 = data
                .iter()
                .enumerate()
                .map(|(i, &b)| (i as u64 + 1) * u64::from(b))
                .sum();
            format!("file {} bytes, sum {sum}", data.len())
        };
        let mode = if meta.file_type().is_symlink() {
            0
        } else {
            meta.mode() & 0o7777
        };
        let mtime = if meta.is_dir() { 0 } else { meta.mtime() };
        out.insert(rel, format!("{what}, mode {mode:o}, mtime {mtime}"));
    }
    for group in inodes.values().filter(|g| g.len() > 1) {
        for p in group {
            let others: Vec<_> = group.iter().filter(|o| *o != p).collect();
            out.get_mut(p)
                .unwrap()
                .push_str(&format!(", linked with {others:?}"));
        }
    }
    out
}

/// Archives written by other tools in their formats (GNU tar: gnu, oldgnu, posix, ustar, v7,
/// GNU sparse in every version, a volume label, base-256 fields; bsdtar: pax, ustar, gnutar, v7;
/// Python's tarfile: GNU, PAX, USTAR, pax global headers; redundant long-name headers): for
/// each one GNU tar extracts cleanly, `restore` gives the same tree (kinds, contents, modes,
/// mtimes, link targets, hard links) or refuses the archive, saying why and leaving the target
/// empty; never a different tree. (It used to give a different tree for 6 of 50, silently.)
#[test]
fn restore_gives_gnu_tars_tree_or_refuses_for_archives_other_tools_wrote() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    fs::create_dir(&corpus).unwrap();
    let made = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/tools/tar_corpus.py"))
        .arg(&corpus)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let names: Vec<String> = String::from_utf8(made.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 20, "{names:?}");
    let bucket = server.bucket("corpus");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[dir.path()], "", ""),
    );
    let (mut same, mut refused, mut gnu_fails) = (Vec::new(), Vec::new(), Vec::new());
    for name in &names {
        let archive = corpus.join(format!("{name}.tar"));
        let gnu = dir.path().join("gnu").join(name);
        fs::create_dir_all(&gnu).unwrap();
        let gnu_tar = Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&gnu)
            .arg("--no-same-owner")
            .output()
            .unwrap();
        if !gnu_tar.status.success() {
            gnu_fails.push(name.clone());
            continue;
        }
        let key = format!("backups/standalone/corpus/20260101T000000Z-{name}.tar");
        server.put(&bucket, &key, fs::read(&archive).unwrap());
        let ours = dir.path().join("ours").join(name);
        let out = lb.run(&[
            "restore",
            "--key",
            &key,
            "--to",
            ours.to_str().unwrap(),
            "--force-unverified",
        ]);
        match out.code {
            Some(0) => {
                let (want, got) = (tree_of(&gnu), tree_of(&ours));
                let diff: Vec<_> = want
                    .iter()
                    .filter(|(p, w)| got.get(*p) != Some(*w))
                    .map(|(p, w)| {
                        format!("{}: GNU tar {w}, lifeboat {:?}", p.display(), got.get(p))
                    })
                    .chain(
                        got.keys()
                            .filter(|p| !want.contains_key(*p))
                            .map(|p| format!("{}: only lifeboat has it", p.display())),
                    )
                    .collect();
                assert!(
                    diff.is_empty(),
                    "{name}: a different tree than GNU tar's:\n{}",
                    diff.join("\n")
                );
                same.push(name.clone());
            }
            Some(1 | 3) => {
                assert_eq!(
                    fs::read_dir(&ours).map(|d| d.count()).unwrap_or(0),
                    0,
                    "{name}: refused, but left something in the target"
                );
                let why = out.stderr.lines().last().unwrap_or_default().to_owned();
                assert!(!why.is_empty(), "{name}: refused without saying why");
                refused.push(format!("{name}: {why}"));
            }
            _ => panic!("{name}: {out:#?}"),
        }
    }
    eprintln!(
        "corpus: {} archives; {} restored as GNU tar does, {} refused, {} that GNU tar fails on",
        names.len(),
        same.len(),
        refused.len(),
        gnu_fails.len()
    );
    for r in &refused {
        eprintln!("  refused {r}");
    }
    // What GNU tar writes is restored, not merely refused.
    for must in [
        "gnutar-gnu",
        "gnutar-oldgnu",
        "gnutar-posix",
        "gnutar-ustar",
        "gnutar-v7",
        "gnutar-gnu-sparse",
        "gnutar-pax-sparse-0.0",
        "gnutar-pax-sparse-0.1",
        "gnutar-pax-sparse-1.0",
        "gnutar-volume-label",
        "gnutar-base256-uid",
        "python-pax-global-comment",
    ] {
        assert!(
            same.iter().any(|n| n == must),
            "{must} was not restored: {refused:#?}"
        );
    }
}

/// Archives cut short or with data after their end: at an entry boundary (a plain tar), at a
/// gzip member boundary, garbage appended. Each is refused, with its manifest (the size and
/// SHA-256 tell) and without one (`--force-unverified`: the tar stream itself tells), with a
/// message saying nothing was restored, and the target is left empty.
#[test]
fn a_truncated_or_extended_archive_is_refused_and_leaves_nothing() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for i in 0..3 {
        write(
            &data.join(format!("f{i}.bin")),
            &crate::support::noise(1 << 20, i),
        );
    }
    let bucket = server.bucket("damaged");
    let backup = |compression: &str| {
        let lb = Lifeboat::new(
            dir.path(),
            &server.endpoint,
            &config_for(
                &bucket,
                &[&data],
                &format!("compression = \"{compression}\""),
                "",
            ),
        );
        let key = lb.run(&["backup"]).stored_key();
        (lb, server.get(&bucket, &key), key)
    };
    let (lb, tar, tar_key) = backup("none");
    let (_, gz, gz_key) = backup("gzip");
    // The second entry's header: the plain tar cut there ends at an entry boundary.
    let second = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .nth(1)
        .unwrap()
        .unwrap()
        .raw_header_position() as usize;
    // The end of the first gzip member.
    let mut rest = &gz[..];
    std::io::copy(
        &mut flate2::bufread::GzDecoder::new(&mut rest),
        &mut std::io::sink(),
    )
    .unwrap();
    let first_member = gz.len() - rest.len();
    assert!(first_member < gz.len(), "the archive has several members");
    let mut extended = gz.clone();
    extended.extend_from_slice(b"appended after the end of the archive");
    let cases = [
        ("cut-at-entry", &tar[..second], &tar_key),
        ("cut-at-member", &gz[..first_member], &gz_key),
        ("garbage-after-end", &extended[..], &gz_key),
    ];
    for (what, bytes, original) in cases {
        let suffix = if original.ends_with(".tar.gz") {
            ".tar.gz"
        } else {
            ".tar"
        };
        let key = original.replace(suffix, &format!("-{what}{suffix}"));
        let manifest = |k: &str| k.replace(suffix, ".manifest.json");
        server.put(&bucket, &key, bytes.to_vec());
        for verified in [true, false] {
            let target = dir.path().join(format!("target-{what}-{verified}"));
            let mut args = vec!["restore", "--key", &key, "--to", target.to_str().unwrap()];
            if verified {
                server.put(
                    &bucket,
                    &manifest(&key),
                    server.get(&bucket, &manifest(original)),
                );
            } else {
                server.put(&bucket, &manifest(&key), b"{}".to_vec());
                args.push("--force-unverified");
            }
            let out = lb.run(&args);
            assert!(
                matches!(out.code, Some(1 | 3)),
                "{what} (verified: {verified}): {out:#?}"
            );
            assert!(
                out.stderr.contains("nothing was restored"),
                "{what} (verified: {verified}): {out:#?}"
            );
            assert_eq!(
                fs::read_dir(&target).map(|d| d.count()).unwrap_or(0),
                0,
                "{what} (verified: {verified}): something was left in the target"
            );
        }
    }
}

/// An archive of several download ranges (2 MiB each), so it is fetched in ranges, several at
/// once, and reassembled in order, from both S3 servers: `verify` passes and `restore` gives the tree
/// back exactly, for each codec (gzip and zstd cut into units decompressed in parallel, plain
/// tar read straight through).
#[test]
fn an_archive_of_several_download_ranges_verifies_and_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for i in 0..11 {
        write(
            &data.join(format!("noise/f{i:02}.bin")),
            &crate::support::noise(1 << 20, i + 7),
        );
    }
    for i in 0..300 {
        write(
            &data.join(format!("text/{}/t{i:03}.log", i % 7)),
            format!("entry {i}\n").repeat(i + 1).as_bytes(),
        );
    }
    let want = tree_of(&data);
    for (name, server) in [("s3s-fs", s3s_fs()), ("moto", moto())] {
        for compression in ["gzip", "zstd", "none"] {
            let bucket = server.bucket(&format!("ranges-{compression}"));
            let lb = Lifeboat::new(
                dir.path(),
                &server.endpoint,
                &config_for(
                    &bucket,
                    &[&data],
                    &format!("compression = \"{compression}\""),
                    "",
                ),
            );
            let key = lb.run(&["backup"]).stored_key();
            let size = server.get(&bucket, &key).len();
            assert!(size > 4 * (2 << 20), "{name} {compression}: {size} bytes");
            let out = lb.run(&["verify", "--key", &key]);
            assert_eq!(out.code, Some(0), "{name} {compression}: {out:#?}");
            let target = dir.path().join(format!("target-{name}-{compression}"));
            lb.run(&["restore", "--key", &key, "--to", target.to_str().unwrap()])
                .ok();
            let inner = target.join(data.strip_prefix("/").unwrap());
            assert_eq!(tree_of(&inner), want, "{name} {compression}");
        }
    }
}

/// An archive stored in an archive tier (GLACIER, DEEP_ARCHIVE) cannot be read until S3 restores
/// it. Its manifest must stay readable (STANDARD, whatever `s3.storage_class` says), and restore
/// and verify must say what to do instead of failing with S3's InvalidObjectState.
#[test]
fn a_glacier_archive_keeps_its_manifest_readable_and_restore_says_what_to_do() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.log"), b"saved before the instance went\n");
    let bucket = server.bucket("glacier");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[&data], "", "storage_class = \"GLACIER\""),
    );
    let key = lb.run(&["backup"]).stored_key();
    let class = |key: &str| {
        let head = crate::support::rt()
            .block_on(
                server
                    .client()
                    .head_object()
                    .bucket(&bucket)
                    .key(key)
                    .send(),
            )
            .unwrap();
        head.storage_class()
            .map_or("STANDARD".to_owned(), |c| c.as_str().to_owned())
    };
    assert_eq!(class(&key), "GLACIER");
    let manifest = key.rsplit_once(".tar").unwrap().0.to_owned() + ".manifest.json";
    assert_eq!(class(&manifest), "STANDARD");
    for args in [
        vec!["restore", "--key", &key, "--to", "/nonexistent-target"],
        vec!["verify", "--key", &key],
    ] {
        let out = lb.run(&args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:#?}");
        assert!(
            out.stderr.contains("GLACIER")
                && out.stderr.contains(&key)
                && out.stderr.contains("restore-object"),
            "{args:?}: {out:#?}"
        );
    }
    // --request-restore asks S3 for a readable copy (moto makes it at once); then it restores.
    let target = dir.path().join("target");
    let target = target.to_str().unwrap();
    let out = lb.run(&[
        "restore",
        "--key",
        &key,
        "--to",
        target,
        "--request-restore",
    ]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("asked S3 to restore"), "{out:#?}");
    let out = lb.run(&["restore", "--key", &key, "--to", target]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let back = std::fs::read(
        Path::new(target)
            .join(data.strip_prefix("/").unwrap())
            .join("app.log"),
    )
    .unwrap();
    assert_eq!(back, b"saved before the instance went\n");
}
