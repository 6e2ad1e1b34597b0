//! `config check` and `backup --dry-run`: the configuration contract and its errors.

use crate::support::{Lifeboat, config_for, write};

#[test]
fn config_check_prints_the_effective_config_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let lb = Lifeboat::new(
        dir.path(),
        "http://127.0.0.1:9",
        "[s3]\nbucket = \"my-backups\"\n",
    );
    let out = lb.run(&["config", "check"]);
    let text = out.ok();
    assert!(text.contains("bucket = \"my-backups\""), "{text}");
    assert!(text.contains("paths = [\"/var/log\"]"), "{text}");
    assert!(text.contains("part_size = \"auto\""), "{text}");
    assert!(text.contains("memory_limit = \"128MiB\""), "{text}");
    assert!(text.contains("compression = \"gzip\""), "{text}");
    assert!(text.contains("poll_interval = \"5s\""), "{text}");
}

#[test]
fn config_check_normalises_paths_and_says_what_overlaps() {
    let dir = tempfile::tempdir().unwrap();
    let lb = Lifeboat::new(
        dir.path(),
        "http://127.0.0.1:9",
        "[backup]\npaths = [\"/var/log/\", \"/var/./\", \"/var/log\"]\n[s3]\nbucket = \"b-1\"\n",
    );
    let out = lb.run(&["config", "check"]);
    let text = out.ok();
    assert!(
        text.contains("paths = [\n    \"/var/log\",\n    \"/var\",\n]")
            || text.contains("paths = [\"/var/log\", \"/var\"]"),
        "{text}"
    );
    assert!(
        text.contains("# note: backup.paths: /var/log is inside /var: archived once"),
        "{text}"
    );
}

#[test]
fn config_errors_name_file_key_and_problem_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[s3]\nbukcet = \"x\"\n", "bukcet"),
        (
            "[backup]\npaths = [\"var/log\"]\n[s3]\nbucket = \"b-1\"\n",
            "backup.paths[0]",
        ),
        (
            "[s3]\nbucket = \"b-1\"\npart_size = \"huge\"\n",
            "s3.part_size",
        ),
        (
            "[s3]\nbucket = \"b-1\"\n[watch]\npoll_interval = \"often\"\n",
            "watch.poll_interval",
        ),
        ("[backup]\npaths = [\"/x\"]\n", "s3.bucket"),
        // Parts that cannot fit the memory budget: every key involved is named.
        (
            "[s3]\nbucket = \"b-1\"\npart_size = \"64MiB\"\nconcurrency = 4\n",
            "s3.concurrency = 4 parts of s3.part_size",
        ),
        (
            "[backup]\nmemory_limit = \"16MiB\"\n[s3]\nbucket = \"b-1\"\n",
            "backup.memory_limit",
        ),
    ];
    for (text, key) in cases {
        let lb = Lifeboat::new(dir.path(), "http://127.0.0.1:9", text);
        let out = lb.run(&["config", "check"]);
        assert_eq!(out.code, Some(2), "{text}: {out:#?}");
        assert!(
            out.stderr.contains(&lb.config.display().to_string()),
            "{out:#?}"
        );
        assert!(out.stderr.contains(key), "{key}: {out:#?}");
    }
    // A missing file is a config error too.
    let lb = Lifeboat::new(dir.path(), "http://127.0.0.1:9", "");
    let out = lb.run(&["--config", "/nonexistent/lifeboat.toml", "config", "check"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("/nonexistent/lifeboat.toml"),
        "{out:#?}"
    );
}

#[test]
fn dry_run_counts_without_uploading() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"12345");
    write(&data.join("sub/b.log"), b"123");
    write(&data.join("sub/c.tmp"), b"excluded");
    let status = std::process::Command::new("mkfifo")
        .arg(data.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    // The endpoint is closed: a dry run must not need S3 at all.
    let lb = Lifeboat::new(
        dir.path(),
        "http://127.0.0.1:9",
        &config_for("no-such-bucket", &[&data], "exclude = [\"*.tmp\"]", ""),
    );
    let out = lb.run(&["backup", "--dry-run"]);
    let text = out.ok();
    assert!(text.contains("would archive 2 files (8 B)"), "{text}");
    assert!(text.contains("would skip 1"), "{text}");
    assert!(text.contains("pipe (fifo)"), "{text}");
}
