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

/// A backup path that does not exist (yet) is worth a word, not a refusal: it may appear later
/// (an application's data directory created at its first start).
#[test]
fn config_check_warns_about_paths_that_do_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-yet");
    let lb = Lifeboat::new(
        dir.path(),
        "http://127.0.0.1:9",
        &config_for("b-1", &[dir.path(), &missing], "", ""),
    );
    let out = lb.run(&["config", "check"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let warning = format!(
        "lifeboat: warning: backup.paths: {} does not exist",
        missing.display()
    );
    assert!(out.stderr.contains(&warning), "{out:#?}");
    assert!(
        !out.stderr
            .contains(&format!("{} does not exist", dir.path().display())),
        "{out:#?}"
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
        // A name S3 would refuse (at the first upload: a termination) is refused here.
        ("[s3]\nbucket = \"-my..backups-\"\n", "s3.bucket"),
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

/// A config written before the memory budget asked for parts that no longer fit: `config check`
/// refuses it, naming the keys, but a backup (and the daemon) must not, or an upgrade leaves
/// instances that save nothing at termination. The backup caps the parts and says so.
#[test]
fn parts_that_do_not_fit_the_budget_are_capped_by_a_backup_not_refused() {
    let server = crate::support::s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), &crate::support::noise(3 << 20, 7));
    let bucket = server.bucket("capped-parts");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(
            &bucket,
            &[&data],
            "",
            "part_size = \"64MiB\"\nconcurrency = 4",
        ),
    );
    let check = lb.run(&["config", "check"]);
    assert_eq!(check.code, Some(2), "{check:#?}");
    assert!(
        check
            .stderr
            .contains("s3.concurrency = 4 parts of s3.part_size"),
        "{check:#?}"
    );
    let out = lb.run(&["backup", "--reason", "upgraded config"]);
    let key = out.stored_key();
    assert!(
        out.stderr.contains("s3.part_size") && out.stderr.contains("capped to fit"),
        "{out:#?}"
    );
    let restored = dir.path().join("restored");
    lb.run(&["restore", "--key", &key, "--to", restored.to_str().unwrap()])
        .ok();
    let back = std::fs::read(restored.join(data.strip_prefix("/").unwrap()).join("a.log")).unwrap();
    assert_eq!(back, crate::support::noise(3 << 20, 7));
}

/// First contact: `status` answers without a configuration (it reads only the daemon's
/// state), and `restore`'s usage says that it needs --key or --instance-id.
#[test]
fn status_needs_no_config_and_restore_says_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let lb = Lifeboat::new(dir.path(), "http://127.0.0.1:9", "");
    let out = lb.run(&["--config", "/nonexistent/lifeboat.toml", "status"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("daemon: not running"), "{out:#?}");

    let out = lb.run(&["restore", "--to", "/tmp/x"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(
        out.stderr
            .contains("<--key <KEY>|--instance-id <INSTANCE_ID>>"),
        "{out:#?}"
    );
}

/// An unreachable endpoint reads as one sentence naming the endpoint and the fix, in `list` and
/// `backup`, not the SDK's debug dump; `-vv` adds the full detail.
#[test]
fn an_unreachable_endpoint_is_one_sentence_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.txt"), b"x");
    let lb = Lifeboat::new(
        dir.path(),
        "http://127.0.0.1:9",
        &config_for("my-backups", &[&data], "", ""),
    );
    for args in [&["list"][..], &["backup"][..]] {
        let out = lb.run(args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:#?}");
        assert!(
            out.stderr.contains("could not reach the service")
                && out.stderr.contains("Connection refused")
                && out
                    .stderr
                    .contains("check the endpoint http://127.0.0.1:9 (AWS_ENDPOINT_URL)")
                && !out.stderr.contains("DispatchFailure"),
            "{args:?}: {out:#?}"
        );
    }
    let out = lb.run(&["-vv", "list"]);
    assert!(out.stderr.contains("AWS SDK error in full"), "{out:#?}");
}

/// The manual says what --help cannot: ENVIRONMENT, FILES, EXIT STATUS and every configuration
/// key; each subcommand's page names the version in its footer.
#[test]
fn the_manual_has_environment_files_exit_status_and_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let lb = Lifeboat::new(dir.path(), "http://127.0.0.1:9", "");
    let man = dir.path().join("man");
    let out = lb.run(&["manpage", man.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let page = std::fs::read_to_string(man.join("lifeboat.1")).unwrap();
    for needle in [
        ".SH ENVIRONMENT",
        "LIFEBOAT_CONFIG",
        ".SH FILES",
        "/etc/lifeboat/lifeboat.toml",
        ".SH EXIT STATUS",
        ".SH CONFIGURATION",
        "# config_poll = \"5m\"",
        "# after_backup = false",
    ] {
        assert!(page.contains(needle), "{needle} missing from lifeboat.1");
    }
    let version = env!("CARGO_PKG_VERSION");
    let backup = std::fs::read_to_string(man.join("lifeboat-backup.1")).unwrap();
    assert!(
        backup.contains(&format!(".TH lifeboat-backup 1  \"backup {version}\"")),
        "{}",
        backup.lines().take(4).collect::<Vec<_>>().join("\n")
    );
}
