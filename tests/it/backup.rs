//! Round trips: a hostile-but-real tree backed up to each S3 server, then extracted by GNU tar and
//! by `lifeboat restore`, compared entry by entry; plus list, verify and the manifest's contents.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{Lifeboat, Server, config_for, moto, s3s_fs, write};

/// Apparent size of the sparse file: past the 8 GiB limit of plain tar headers.
const SPARSE_SIZE: u64 = (8 << 30) + 12_345;
const MTIME: i64 = 1_700_000_000;

fn non_utf8_name() -> &'static std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(b"caf\xe9-latin1.txt")
}

fn long_path(root: &Path) -> PathBuf {
    let mut p = root.join("long");
    for i in 0..6 {
        p.push(format!("{i}-{}", "d".repeat(48)));
    }
    let p = p.join("leaf.txt");
    assert!(p.strip_prefix(root).unwrap().as_os_str().len() >= 300);
    p
}

/// Builds the tree the issue names; returns the path of the file to append to while backing up.
fn build_tree(root: &Path, sparse: bool) -> PathBuf {
    write(&root.join("nested/a/b/c/deep.txt"), b"deep\n");
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    write(&root.join("plain.txt"), b"plain text\n");
    write(&root.join("script.sh"), b"#!/bin/sh\necho hi\n");
    fs::set_permissions(root.join("script.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("plain.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    symlink("nested/a/b/c/deep.txt", root.join("link-to-deep")).unwrap();
    symlink("/nonexistent/target", root.join("dangling-link")).unwrap();
    write(&root.join("hard-1"), b"shared inode\n");
    fs::hard_link(root.join("hard-1"), root.join("hard-2")).unwrap();
    write(&root.join(non_utf8_name()), b"latin-1 name\n");
    write(&long_path(root), b"a long way down\n");
    let random: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(&root.join("blob.bin"), &random);
    assert!(
        Command::new("mkfifo")
            .arg(root.join("fifo"))
            .status()
            .unwrap()
            .success()
    );
    if sparse {
        let f = fs::File::create(root.join("sparse.img")).unwrap();
        f.set_len(SPARSE_SIZE).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", SPARSE_SIZE - 4).unwrap();
    }
    let growing = root.join("growing.log");
    write(&growing, b"first line\n");
    // Fixed mtimes everywhere (deepest first), so comparisons are exact.
    let t = filetime::FileTime::from_unix_time(MTIME, 0);
    let mut all: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in all {
        filetime::set_symlink_file_times(&p, t, t).unwrap();
    }
    growing
}

/// Appends lines to `path` until stopped, like a busy log.
fn start_appender(path: PathBuf) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        let mut n = 0u64;
        while !flag.load(Ordering::Relaxed) {
            writeln!(f, "appended line {n}").unwrap();
            n += 1;
            // Pacing, like a real log writer: not a wait for a condition.
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    (stop, handle)
}

/// Compares the restored tree with the original, entry by entry.
fn compare_trees(orig: &Path, restored: &Path, growing: &Path, sparse_checked_elsewhere: bool) {
    for entry in walkdir::WalkDir::new(orig).min_depth(1) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(orig).unwrap();
        let there = restored.join(rel);
        let meta = entry.path().symlink_metadata().unwrap();
        if meta.file_type().is_fifo() {
            assert!(
                there.symlink_metadata().is_err(),
                "FIFO {rel:?} must not be restored"
            );
            continue;
        }
        if sparse_checked_elsewhere && rel == Path::new("sparse.img") {
            continue;
        }
        let rmeta = there
            .symlink_metadata()
            .unwrap_or_else(|e| panic!("{rel:?} missing in {}: {e}", restored.display()));
        assert_eq!(meta.file_type(), rmeta.file_type(), "{rel:?}");
        if meta.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(entry.path()).unwrap(),
                fs::read_link(&there).unwrap()
            );
            continue;
        }
        assert_eq!(
            meta.mode() & 0o7777,
            rmeta.mode() & 0o7777,
            "mode of {rel:?}"
        );
        if entry.path() == growing {
            let now = fs::read(entry.path()).unwrap();
            let got = fs::read(&there).unwrap();
            assert!(
                got.len() >= 11 && now.starts_with(&got),
                "{rel:?} is not a prefix"
            );
            continue;
        }
        assert_eq!(meta.mtime(), rmeta.mtime(), "mtime of {rel:?}");
        if meta.is_file() && rel != Path::new("sparse.img") {
            assert_eq!(
                fs::read(entry.path()).unwrap(),
                fs::read(&there).unwrap(),
                "{rel:?}"
            );
        }
    }
    // Hard links stay hard links.
    let a = restored.join("hard-1").metadata().unwrap();
    let b = restored.join("hard-2").metadata().unwrap();
    assert_eq!(a.ino(), b.ino(), "hard-1 and hard-2 share an inode");
}

fn check_sparse(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(path).unwrap();
    let meta = f.metadata().unwrap();
    assert_eq!(meta.len(), SPARSE_SIZE);
    let mut buf = [0u8; 4];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"head");
    f.read_exact_at(&mut buf, SPARSE_SIZE - 4).unwrap();
    assert_eq!(&buf, b"tail");
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "restored sparse file uses {} bytes on disk",
        meta.blocks() * 512
    );
}

fn round_trip(server: &Server, sparse: bool, compression: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let growing = build_tree(&data, sparse);
    let bucket = server.bucket("roundtrip");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(
            &bucket,
            &[&data],
            &format!("compression = \"{compression}\""),
            "part_size = \"5MiB\"\nconcurrency = 3",
        ),
    );
    let (stop, appender) = start_appender(growing.clone());
    let out = lb.run(&["backup", "--reason", "round trip"]);
    stop.store(true, Ordering::Relaxed);
    appender.join().unwrap();
    let key = out.stored_key();
    assert!(key.starts_with("backups/standalone/"), "{key}");
    assert!(key.contains("-round-trip.tar"), "{key}");

    // The manifest lists the FIFO as skipped and every file with its metadata.
    let manifest_key = key.rsplit_once(".tar").unwrap().0.to_owned() + ".manifest.json";
    let manifest: serde_json::Value =
        serde_json::from_slice(&server.get(&bucket, &manifest_key)).unwrap();
    let skipped = manifest["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0]["path"].as_str().unwrap().ends_with("/fifo"));
    assert_eq!(skipped[0]["reason"], "fifo");
    assert_eq!(manifest["partial"], false);
    assert_eq!(manifest["instance"]["group"], "standalone");
    assert_eq!(manifest["compression"], compression);
    let files = manifest["files"].as_array().unwrap();
    let plain = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("/plain.txt"))
        .unwrap();
    assert_eq!(plain["mode"], 0o640);
    assert_eq!(plain["mtime"], MTIME);
    assert_eq!(plain["size"], 11);
    assert!(
        files.iter().any(|f| f["path_hex"].is_string()),
        "non-UTF-8 name recorded"
    );

    // GNU tar reads the archive without a warning.
    let archive = dir.path().join("archive");
    fs::write(&archive, server.get(&bucket, &key)).unwrap();
    let gnu = dir.path().join("gnu");
    fs::create_dir_all(&gnu).unwrap();
    let decompress = match compression {
        "gzip" => "--gzip",
        "zstd" => "--zstd",
        _ => "--no-auto-compress",
    };
    let mut tar = Command::new("tar");
    tar.arg("-x")
        .arg(decompress)
        .arg("-f")
        .arg(&archive)
        .arg("-C")
        .arg(&gnu)
        .arg("--numeric-owner");
    let out = tar.output().unwrap();
    assert!(out.status.success(), "GNU tar failed: {out:?}");
    assert!(
        out.stderr.is_empty(),
        "GNU tar warned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rel = data.strip_prefix("/").unwrap();
    compare_trees(&data, &gnu.join(rel), &growing, sparse);
    if sparse {
        // Stored as a GNU sparse entry: GNU tar recreates the holes and lists the full size.
        check_sparse(&gnu.join(rel).join("sparse.img"));
        let out = Command::new("tar")
            .args(["-t", "-v", decompress, "--numeric-owner", "-f"])
            .arg(&archive)
            .arg("--wildcards")
            .arg("*/sparse.img")
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
        assert!(listing.contains(&SPARSE_SIZE.to_string()), "{listing}");
    }

    // lifeboat restore, and verify.
    let restored = dir.path().join("restored");
    lb.run(&["restore", "--key", &key, "--to", restored.to_str().unwrap()])
        .ok();
    compare_trees(&data, &restored.join(rel), &growing, false);
    if sparse {
        check_sparse(&restored.join(rel).join("sparse.img"));
    }
    let out = lb.run(&["verify", "--key", &key]);
    assert!(out.ok().starts_with("OK "), "{out:#?}");
}

#[test]
fn round_trip_through_s3s_fs_with_a_sparse_8_gib_file() {
    round_trip(s3s_fs(), true, "gzip");
}

#[test]
fn round_trip_through_moto_with_a_sparse_8_gib_file() {
    round_trip(moto(), true, "gzip");
}

#[test]
fn round_trip_zstd_and_plain_tar() {
    round_trip(s3s_fs(), false, "zstd");
    round_trip(moto(), false, "none");
}

#[test]
fn list_shows_newest_first_and_restore_latest_picks_it() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("v.txt"), b"one");
    let bucket = server.bucket("list");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[&data], "", ""),
    );
    let first = lb.run(&["backup", "--reason", "first"]).stored_key();
    // Keys carry second-resolution times; a different reason keeps the keys apart either way.
    write(&data.join("v.txt"), b"two");
    let second = lb.run(&["backup", "--reason", "second"]).stored_key();
    let out = lb.run(&["list"]);
    let text = out.ok();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    // Time, status, size, reason, instance, key.
    let columns: Vec<&str> = lines[1].split_whitespace().collect();
    assert!(columns[0].ends_with('Z'), "{text}");
    assert_eq!(columns[1], "complete", "{text}");
    assert_eq!(columns[4], "second", "{text}");
    // Same second or not, the later backup sorts first (time, then reason, descending).
    assert!(
        text.find(&second).unwrap() < text.find(&first).unwrap(),
        "{text}"
    );
    let instance = first.split('/').nth(2).unwrap();
    let restored = dir.path().join("r");
    lb.run(&[
        "restore",
        "--instance-id",
        instance,
        "--latest",
        "--to",
        restored.to_str().unwrap(),
    ])
    .ok();
    let got = fs::read(restored.join(data.strip_prefix("/").unwrap()).join("v.txt")).unwrap();
    assert_eq!(got, b"two");
    let out = lb.run(&["list", "--instance-id", "i-doesnotexist"]);
    assert_eq!(out.code, Some(0));
    assert!(out.stderr.contains("no backups"), "{out:#?}");
}

/// A tmpfs mounted at `path` (the test runs as root, as CI does); unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path) -> Self {
        fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "lifeboat-test"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs {} (needs root)", path.display());
        Self(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `paths = [root, root/data]` where `root/data` is another file system: with
/// `one_file_system` the walk of `root` stops at the mount, and `root/data`, listed on its own, is
/// archived as its own path (it used to be dropped as "inside an earlier path"). Listed the other
/// way round, `[root/log, root]`, nothing is archived twice (it used to be, and verify then failed).
#[test]
fn overlapping_paths_archive_each_file_once_and_a_nested_mount_is_not_missed() {
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write(&root.join("log/app.log"), b"log\n");
    write(&root.join("etc.conf"), b"conf\n");
    let data = Tmpfs::mount(&root.join("data"));
    write(&data.0.join("db.sqlite"), b"rows\n");
    let bucket = server.bucket("overlap");
    for paths in [
        vec![root.clone(), root.join("data")],
        vec![root.join("log"), root.clone(), root.join("data")],
    ] {
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let lb = Lifeboat::new(
            dir.path(),
            &server.endpoint,
            &config_for(&bucket, &refs, "", ""),
        );
        let key = lb.run(&["backup"]).stored_key();
        let archive = server.data_dir.as_ref().unwrap().join(&bucket).join(&key);
        let listing = Command::new("tar")
            .arg("-tzf")
            .arg(&archive)
            .output()
            .unwrap();
        assert!(listing.status.success(), "{listing:?}");
        let names = String::from_utf8(listing.stdout).unwrap();
        for file in ["log/app.log", "etc.conf", "data/db.sqlite"] {
            let n = names.lines().filter(|l| l.ends_with(file)).count();
            assert_eq!(n, 1, "{file} archived {n} times with {paths:?}:\n{names}");
        }
        lb.run(&["verify", "--key", &key]).ok();
    }
    drop(data);
}

/// `sse = "aws:kms"` with a key: the archive (every part of a multipart upload) and its
/// manifest are stored encrypted with that key, and they restore.
#[test]
fn sse_kms_stores_archive_and_manifest_under_the_configured_key() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("big.bin"), &crate::support::noise(12 << 20, 7));
    let bucket = server.bucket("kms");
    let key_arn = "arn:aws:kms:us-east-1:123456789012:key/6f1c2c5e-8d3b-4f57-9a55-0a1d2b3c4d5e";
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(
            &bucket,
            &[&data],
            "compression = \"none\"",
            &format!("part_size = \"5MiB\"\nsse = \"aws:kms\"\nkms_key_id = \"{key_arn}\""),
        ),
    );
    let key = lb.run(&["backup"]).stored_key();
    let client = server.client();
    for k in [key.clone(), key.replace(".tar", ".manifest.json")] {
        let head = crate::support::rt()
            .block_on(client.head_object().bucket(&bucket).key(&k).send())
            .unwrap();
        assert_eq!(
            head.server_side_encryption().map(|s| s.as_str()),
            Some("aws:kms"),
            "{k}"
        );
        assert_eq!(head.ssekms_key_id(), Some(key_arn), "{k}");
    }
    let target = dir.path().join("restored");
    lb.run(&["restore", "--key", &key, "--to", target.to_str().unwrap()])
        .ok();
    let restored = target.join(data.strip_prefix("/").unwrap()).join("big.bin");
    assert_eq!(fs::read(restored).unwrap().len(), 12 << 20);
}

/// `list` at fleet scale: `--group` narrows the listing itself, `--since` and `--limit` cut it
/// newest first, and only what is printed has its manifest looked at.
#[test]
fn list_filters_by_group_time_and_limit() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let bucket = server.bucket("list-filters");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[dir.path()], "", ""),
    );
    let keys = [
        ("web/i-1/20261101T000000Z-a", true),
        ("web/i-2/20261120T000000Z-b", true),
        ("web/i-2/20261125T000000Z-c", false),
        ("db/i-3/20261126T000000Z-d", true),
        ("team%2Fweb/i-4/20261127T000000Z-e", true),
    ];
    for (stem, with_manifest) in keys {
        server.put(&bucket, &format!("backups/{stem}.tar"), b"x".to_vec());
        if with_manifest {
            server.put(
                &bucket,
                &format!("backups/{stem}.manifest.json"),
                b"{}".to_vec(),
            );
        }
    }
    let names = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["list"];
        all.extend_from_slice(args);
        lb.run(&all)
            .ok()
            .lines()
            .skip(1)
            .map(|l| {
                l.rsplit('-')
                    .next()
                    .unwrap()
                    .trim_end_matches(".tar")
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(names(&["--group", "web"]), ["c", "b", "a"]);
    assert_eq!(
        names(&["--group", "web", "--since", "2026-11-15"]),
        ["c", "b"]
    );
    assert_eq!(
        names(&["--since", "2026-11-25T12:00:00Z", "--limit", "5"]),
        ["e", "d"]
    );
    assert_eq!(names(&["--limit", "2"]), ["e", "d"]);
    assert_eq!(names(&["--group", "team/web"]), ["e"]);
    assert_eq!(names(&["--instance-id", "i-2", "--limit", "1"]), ["c"]);
    let out = lb.run(&["list", "--group", "web"]);
    assert!(out.ok().contains("no-manifest"), "{out:#?}");
    let bad = lb.run(&["list", "--since", "last tuesday"]);
    assert_eq!(bad.code, Some(2), "{bad:#?}");
    assert!(bad.stderr.contains("is not a time"), "{bad:#?}");
}

/// `--json`: each command prints one JSON document on stdout with the fields the README lists.
#[test]
fn json_outputs_parse_and_carry_the_documented_fields() {
    let server = moto();
    let bucket = server.bucket("json-out");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.txt"), b"json\n");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[&data], "", ""),
    );
    let doc = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = lb.run(&all);
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "one document on one line: {out:#?}");
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {out:#?}"))
    };

    let backup = doc(&["backup"]);
    assert_eq!(backup["status"], "succeeded", "{backup}");
    let url = backup["object_url"].as_str().unwrap();
    let key = url
        .strip_prefix(&format!("s3://{bucket}/"))
        .unwrap()
        .to_owned();
    for field in [
        "file_count",
        "bytes_read",
        "bytes_stored",
        "changed",
        "started_at",
        "log_url",
    ] {
        assert!(!backup[field].is_null(), "{field}: {backup}");
    }

    let list = doc(&["list"]);
    assert_eq!(list["bucket"], bucket.as_str());
    let archive = &list["archives"][0];
    assert_eq!(archive["key"], key.as_str(), "{list}");
    assert_eq!(archive["status"], "complete");
    assert_eq!(archive["reason"], "manual");
    assert_eq!(archive["partial"], false);
    assert!(
        archive["time"].as_str().unwrap().ends_with('Z'),
        "{archive}"
    );
    assert!(archive["size"].as_u64().unwrap() > 0);

    let verify = doc(&["verify", "--key", &key]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["problems"], serde_json::json!([]));

    let target = dir.path().join("restored");
    let restored = doc(&["restore", "--key", &key, "--to", target.to_str().unwrap()]);
    assert!(restored["entries"].as_u64().unwrap() >= 2, "{restored}");
    assert_eq!(restored["outside"], serde_json::json!([]));

    let config = doc(&["config", "check"]);
    assert_eq!(
        config["config"]["s3"]["bucket"],
        bucket.as_str(),
        "{config}"
    );

    let status = doc(&["status"]);
    assert_eq!(status["daemon_running"], false, "{status}");
    assert_eq!(status["last_job"]["status"], "succeeded", "{status}");

    let mut cmd = lb.command(&["--json", "doctor"]);
    let out =
        crate::support::wait_output(cmd.spawn().unwrap(), Duration::from_secs(120), &["doctor"]);
    let doctor: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let checks = doctor["checks"].as_array().unwrap();
    assert!(
        checks
            .iter()
            .any(|c| c["name"] == "trust store" && c["outcome"] == "ok"),
        "{doctor}"
    );
    assert_eq!(doctor["ok"], out.code == Some(0), "{doctor}");
    for c in checks {
        assert!(
            c["detail"].is_string()
                && ["ok", "warn", "fail"].contains(&c["outcome"].as_str().unwrap()),
            "{c}"
        );
    }
}
