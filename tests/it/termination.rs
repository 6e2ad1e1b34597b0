//! The termination story on its worst days, end to end: real `lifeboat` processes against moto
//! (with lifecycle actions), the IMDSv2 emulator and hung servers on loopback. Each test is a case
//! where an instance used to go with no backup, or a hook was left hanging (issue 8).

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{
    Imds, Lifeboat, daemon_config, eventually, fault, finished_action, free_port, group_with_hook,
    instance_prefix, moto, noise, partial_manifest_before, scale_in, spot_time, start_daemon,
    stop_daemon, wait_output, write,
};

/// GNU tar lists the stored archive of `manifest` (a gzip one) whole: `names` appear, and `sized`
/// at its declared size. The stream is inflated by tests/tools/gunzip_members.py (each member's
/// CRC checked; one repeated byte for byte is inflated once), since GNU gzip needs minutes for the
/// gigabytes of zeros a cut file declares.
fn assert_gnu_tar_lists(
    server: &crate::support::Server,
    bucket: &str,
    manifest: &serde_json::Value,
    names: &[&str],
    sized: (&str, u64),
) {
    let archive = server
        .data_dir
        .as_ref()
        .expect("an s3s-fs bucket")
        .join(bucket)
        .join(manifest["key"].as_str().unwrap());
    let listing = Command::new("sh")
        .arg("-c")
        .arg(r#"python3 "$0" "$1" | tar -tvf -"#)
        .arg(crate::support::root().join("tests/tools/gunzip_members.py"))
        .arg(&archive)
        .output()
        .unwrap();
    assert!(listing.status.success(), "{listing:?}");
    let text = String::from_utf8_lossy(&listing.stdout);
    for name in names {
        assert!(text.contains(name), "{name} missing: {text}");
    }
    let (name, size) = sized;
    assert!(
        text.lines()
            .any(|l| l.contains(name) && l.contains(&size.to_string())),
        "{name} not at {size} bytes: {text}"
    );
}

fn state_json(lb: &Lifeboat) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(lb.dir.join("state/state.json")).ok()?).ok()
}

/// A package upgrade restarts the service mid-backup: the first daemon aborts its upload and
/// leaves the action pending (it used to complete CONTINUE with nothing stored); the next daemon
/// sees the instance still terminating, backs it up and completes.
#[test]
fn sigterm_mid_backup_leaves_the_action_pending_and_the_next_daemon_completes_it() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "restart", 60);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("state.db"), &noise(30 << 20, 0xBEEF));
    let bucket = server.bucket("restart");
    fault(
        server,
        &format!(r#"{{"bucket": "{bucket}", "s3_part_delay_ms": 1500}}"#),
    );
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, ""),
    );
    let first = start_daemon(&lb, &imds, &[]);
    scale_in(server, &group);
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);
    // Mid-upload: a multipart upload is open.
    eventually("an open multipart upload", Duration::from_secs(60), || {
        (server.open_uploads(&bucket) > 0).then_some(())
    });
    let out = first.stop();
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("left pending"), "{out:#?}");

    let action = server
        .actions()
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["instance_id"] == instance.as_str())
        .cloned()
        .unwrap();
    assert!(
        action["result"].is_null(),
        "the action was completed with nothing stored: {action:#}"
    );
    assert_eq!(
        server.open_uploads(&bucket),
        0,
        "the upload was not aborted"
    );
    assert!(
        server
            .keys(&bucket)
            .iter()
            .all(|k| !k.ends_with(".manifest.json")),
        "nothing is stored"
    );
    let state = state_json(&lb).unwrap();
    assert_eq!(state["last_job"]["status"], "interrupted", "{state:#}");
    assert_eq!(
        state["last_job"]["lifecycle"]["outcome"], "left-pending",
        "{state:#}"
    );

    // The service comes back: the instance is still in Terminating:Wait.
    fault(
        server,
        &format!(r#"{{"bucket": "{bucket}", "s3_part_delay_ms": 0}}"#),
    );
    let second = start_daemon(&lb, &imds, &[]);
    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    assert_eq!(action["ended_by"], "completed", "{action:#}");
    let keys = server.keys(&bucket);
    assert!(
        keys.iter().any(|k| k.ends_with("-terminate.manifest.json")),
        "{keys:?}"
    );
    assert_eq!(stop_daemon(second).code, Some(0));
}

/// Instance metadata refuses connections for the first ten seconds after boot: the daemon keeps
/// asking (it used to exit 2, which systemd does not restart, or run for life as `localhost`),
/// then watches, and a Spot notice is backed up under the real instance id.
#[test]
fn a_metadata_outage_at_start_does_not_disable_protection() {
    let server = moto();
    let instance = crate::support::bucket_name("i-outage");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.log"), b"important\n");
    let bucket = server.bucket("outage");
    let config = format!(
        "{}[watch]\npoll_interval = \"1s\"\nmetadata_wait = \"60s\"\n",
        crate::support::config_for(&bucket, &[&data], "", "")
    );
    let lb = Lifeboat::new(dir.path(), &server.endpoint, &config);
    let port = free_port();
    let log_path = dir.path().join("daemon.log");
    let mut cmd = lb.command(&["run"]);
    cmd.env(
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        format!("http://127.0.0.1:{port}"),
    )
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log_path).unwrap());
    let mut daemon = crate::support::Daemon::new(cmd.spawn().unwrap());
    let started = Instant::now();
    eventually(
        "the daemon to say it waits",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&log_path)
                .ok()
                .filter(|l| l.contains("waiting for instance metadata"))
        },
    );
    // Ten seconds of outage, during which the daemon must stay up.
    eventually("ten seconds of outage", Duration::from_secs(30), || {
        assert!(
            daemon.child().try_wait().unwrap().is_none(),
            "the daemon exited during the outage: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        (started.elapsed() >= Duration::from_secs(10)).then_some(())
    });
    let imds = Imds::start_on(port, &instance, "");
    eventually(
        "the daemon's control socket",
        Duration::from_secs(60),
        || lb.dir.join("run/control.sock").exists().then_some(()),
    );
    let (_, at) = spot_time(60);
    imds.set(&format!(
        r#"{{"spot_action": {{"action": "terminate", "time": "{at}"}}}}"#
    ));
    let key = eventually("the manifest", Duration::from_secs(60), || {
        server
            .keys(&bucket)
            .into_iter()
            .find(|k| k.ends_with(".manifest.json"))
    });
    assert!(
        // Not an EC2 instance id: filed under the bare id, not an ARN.
        key.starts_with(&format!("backups/standalone/{instance}/")),
        "stored under the wrong instance: {key}"
    );
    // Its output went to the log file: stop it by hand.
    crate::support::sigterm(daemon.child());
    assert_eq!(daemon.child().wait().unwrap().code(), Some(0));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("instance metadata answers"), "{log}");
}

/// A rebalance recommendation starts an early backup; the two-minute Spot notice arrives while it
/// runs. The Spot deadline binds the running job (it used to be ignored: the backup ran on past
/// the reclaim and nothing was stored in time).
#[test]
fn a_spot_notice_during_a_rebalance_backup_brings_its_deadline() {
    let server = moto();
    let instance = crate::support::bucket_name("i-rebalance");
    let imds = Imds::start(&instance, "");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for i in 0..4 {
        write(
            &data.join(format!("part-{i}.bin")),
            &noise(30 << 20, 200 + i),
        );
    }
    let bucket = server.bucket("rebalance");
    // About 5 MB/s into S3: 120 MB would take 24 s; the Spot notice gives 20.
    fault(
        server,
        &format!(r#"{{"bucket": "{bucket}", "s3_part_delay_ms": 1000}}"#),
    );
    let config = format!(
        "{}[watch]\npoll_interval = \"1s\"\nrebalance = true\n",
        crate::support::config_for(
            &bucket,
            &[&data],
            "compression = \"none\"",
            "part_size = \"5MiB\"\nconcurrency = 1"
        )
    );
    let lb = Lifeboat::new(dir.path(), &server.endpoint, &config);
    let daemon = start_daemon(&lb, &imds, &[]);
    imds.set(r#"{"rebalance": {"noticeTime": "2026-11-27T00:00:00Z"}}"#);
    eventually(
        "the rebalance backup's upload",
        Duration::from_secs(60),
        || (server.open_uploads(&bucket) > 0).then_some(()),
    );
    let (when, at) = spot_time(20);
    imds.set(&format!(
        r#"{{"spot_action": {{"action": "terminate", "time": "{at}"}}}}"#
    ));
    let manifest = partial_manifest_before(server, &bucket, when);
    assert_eq!(manifest["reason"], "rebalance-recommendation");
    assert_eq!(stop_daemon(daemon).code, Some(0));
}

/// The SSM document's entry point stored the data but could not complete the action (no such
/// hook): it exits 4, so Run Command reports Failed and the Lambda steps in (it used to exit 0).
#[test]
fn backup_exits_4_when_the_lifecycle_action_is_not_completed() {
    let server = moto();
    let (group, instance, _topic) = group_with_hook(server, "exit4", 60);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"x\n");
    let bucket = server.bucket("exit4");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &crate::support::config_for(&bucket, &[&data], "", ""),
    );
    let out = lb.run(&[
        "backup",
        "--complete-lifecycle",
        "--hook",
        "no-such-hook",
        "--asg",
        &group,
        "--instance-id",
        &instance,
    ]);
    assert_eq!(out.code, Some(4), "{out:#?}");
    assert!(out.stdout.contains("stored s3://"), "{out:#?}");
    assert!(
        out.stderr
            .contains("the data is stored but the lifecycle action was not completed"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("no-such-hook"), "{out:#?}");
}

/// The SSM document's command to many instances names no instance: `lifeboat backup
/// --complete-lifecycle` learns which one it is from instance metadata. Metadata that does not
/// answer at first (a blip, a thousand instances asking at once) is waited for: the archive is
/// filed under this instance and its action completed CONTINUE. It used to give up after a
/// second and run as "standalone": the archive went under the host name, completion by that
/// "instance id" found no action ("already completed", exit 0), and the real action timed out.
#[test]
fn a_command_without_instance_id_waits_for_metadata_and_completes_its_own_action() {
    let server = moto();
    let (group, instance, _topic) = group_with_hook(server, "oneshot-imds", 120);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.log"), b"precious\n");
    let bucket = server.bucket("oneshot-imds");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, "", ""),
    );
    scale_in(server, &group);
    let port = free_port();
    let mut cmd = lb.command(&[
        "backup",
        "--reason",
        "scale-in",
        "--complete-lifecycle",
        "--hook",
        "lifeboat",
        "--asg",
        &group,
    ]);
    cmd.env(
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        format!("http://127.0.0.1:{port}"),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    // Five seconds without metadata, during which the command must keep waiting.
    eventually("five seconds of outage", Duration::from_secs(30), || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the command gave up during the outage"
        );
        (started.elapsed() >= Duration::from_secs(5)).then_some(())
    });
    let _imds = Imds::start_on(port, &instance, &group);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("completed with CONTINUE"),
        "{stdout}{stderr}"
    );
    let prefix = instance_prefix(&group, &instance);
    let keys = server.keys(&bucket);
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&prefix) && k.ends_with(".manifest.json")),
        "not filed under {prefix}: {keys:?}"
    );
    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    assert_eq!(action["ended_by"], "completed", "{action:#}");
}

/// Accepts connections and never answers (a hung S3 endpoint); counts connections.
fn hung_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            // Read the request so the client is left waiting for an answer, not a reset.
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 4096];
            let _ = (&conn).read(&mut buf);
            held.push(conn);
            if held.len() > 64 {
                break;
            }
        }
    });
    (endpoint, accepted)
}

/// Ctrl-C on `lifeboat backup` against an S3 that accepts and never answers ends the process
/// within seconds with 130 (it used to run on for minutes, until the retry budget ran out).
#[test]
fn ctrl_c_ends_a_backup_against_a_hung_s3_within_seconds() {
    let (endpoint, accepted) = hung_server();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"x\n");
    let lb = Lifeboat::new(
        dir.path(),
        &endpoint,
        &crate::support::config_for("lb-hung", &[&data], "", ""),
    );
    let child = lb.command(&["backup"]).spawn().unwrap();
    eventually("a request to the hung S3", Duration::from_secs(30), || {
        (accepted.load(Ordering::SeqCst) > 0).then_some(())
    });
    let sent = Instant::now();
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = wait_output(child, Duration::from_secs(60), &["backup"]);
    let took = sent.elapsed();
    assert_eq!(out.code, Some(130), "{out:#?}");
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} after Ctrl-C: {out:#?}"
    );
    assert!(out.stderr.contains("interrupted"), "{out:#?}");
}

/// A Spot notice 40 s out while a 24 GiB database file is being read (allocated, so it is read,
/// but little real data so the test is cheap): the archive stops taking data at the partial stop
/// and the rest of the file costs nothing (it used to be zero-filled through the compressor for
/// minutes, missing the reclaim). A valid partial archive and its manifest are in S3 in time.
#[test]
fn a_spot_notice_while_reading_a_24_gib_file_stores_a_valid_partial_archive_in_time() {
    let server = crate::support::s3s_fs();
    let instance = crate::support::bucket_name("i-bigfile");
    let imds = Imds::start(&instance, "");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"first\n");
    let big = data.join("z-big.db");
    let made = Command::new("fallocate")
        .args(["-l", "24GiB", big.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(
        made.success(),
        "fallocate 24 GiB in {}",
        dir.path().display()
    );
    let bucket = server.bucket("bigfile");
    let config = format!(
        "{}[watch]\npoll_interval = \"1s\"\n",
        crate::support::config_for(&bucket, &[&data], "", "")
    );
    let lb = Lifeboat::new(dir.path(), &server.endpoint, &config);
    let daemon = start_daemon(&lb, &imds, &[]);
    let (when, at) = spot_time(40);
    imds.set(&format!(
        r#"{{"spot_action": {{"action": "terminate", "time": "{at}"}}}}"#
    ));
    let manifest = partial_manifest_before(server, &bucket, when);
    let changed = manifest["changed"].as_array().unwrap();
    assert!(
        changed.iter().any(|c| c["reason"]
            .as_str()
            .unwrap()
            .contains("cut at the deadline")),
        "{changed:?}"
    );
    // Valid: GNU tar lists the whole stream, the big file at its declared size.
    assert_gnu_tar_lists(
        server,
        &bucket,
        &manifest,
        &["a.log"],
        ("z-big.db", 24 << 30),
    );
    assert_eq!(stop_daemon(daemon).code, Some(0));
}

/// Answers every request with the headers of a large object and a few bytes, then stalls.
fn stalling_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut conn in listener.incoming().flatten() {
            use std::io::Write;
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 4096];
            let _ = (&conn).read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\nContent-Type: application/gzip\r\nETag: \"stalled\"\r\n\r\n\x1f\x8b\x08\x00\x00\x00\x00\x00",
            );
            held.push(conn);
            if held.len() > 64 {
                break;
            }
        }
    });
    endpoint
}

/// A download that stops delivering mid-body fails after `s3.read_timeout` (it used to hang for
/// ever), and restore says so.
#[test]
fn a_restore_whose_download_stalls_fails_after_the_read_timeout() {
    let endpoint = stalling_server();
    let dir = tempfile::tempdir().unwrap();
    let lb = Lifeboat::new(
        dir.path(),
        &endpoint,
        "[s3]\nbucket = \"lb-stall\"\nread_timeout = \"2s\"\n",
    );
    let target = dir.path().join("restored");
    let out = lb.run_with_limit(
        &[
            "restore",
            "--key",
            "lifeboat/standalone/i-1/20261127T000000Z-manual.tar.gz",
            "--to",
            target.to_str().unwrap(),
            // Its manifest stalls too: restore what it can, to reach the archive's download.
            "--force-unverified",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("timed out"), "{out:#?}");
}

/// A FUSE mount whose `hung.db` stops answering reads after its first MiB
/// (`tests/emulators/hangfs.py`); unmounted (lazily) when dropped.
struct HungMount {
    path: std::path::PathBuf,
    server: std::process::Child,
}

impl HungMount {
    fn mount(path: &std::path::Path) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let server = Command::new(crate::support::root().join(".venv/bin/python"))
            .arg(crate::support::root().join("tests/emulators/hangfs.py"))
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mount = Self {
            path: path.to_owned(),
            server,
        };
        eventually("the FUSE mount", Duration::from_secs(30), || {
            path.join("ok.txt").exists().then_some(())
        });
        mount
    }
}

impl Drop for HungMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A read that never returns (a hung NFS or FUSE mount) at a Spot notice: the archive is closed
/// without the stuck thread, the file recorded as cut, and a valid partial archive is stored in
/// time (the backup used to wait on the read for ever).
#[test]
fn a_read_that_never_returns_is_abandoned_at_the_deadline() {
    let server = crate::support::s3s_fs();
    let instance = crate::support::bucket_name("i-hungfs");
    let imds = Imds::start(&instance, "");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"first\n");
    let mount = HungMount::mount(&dir.path().join("nfs"));
    let bucket = server.bucket("hungfs");
    let config = format!(
        "{}[watch]\npoll_interval = \"1s\"\n",
        crate::support::config_for(&bucket, &[&data, &mount.path], "", "")
    );
    let lb = Lifeboat::new(dir.path(), &server.endpoint, &config);
    let daemon = start_daemon(&lb, &imds, &[]);
    let (when, at) = spot_time(30);
    imds.set(&format!(
        r#"{{"spot_action": {{"action": "terminate", "time": "{at}"}}}}"#
    ));
    let manifest = partial_manifest_before(server, &bucket, when);
    let changed = manifest["changed"].as_array().unwrap();
    assert!(
        changed.iter().any(
            |c| c["path"].as_str().unwrap_or_default().ends_with("hung.db")
                && c["reason"].as_str().unwrap().contains("did not return")
        ),
        "{changed:?}"
    );
    assert_gnu_tar_lists(
        server,
        &bucket,
        &manifest,
        &["a.log"],
        ("hung.db", 256 << 20),
    );
    assert_eq!(stop_daemon(daemon).code, Some(0));
    drop(mount);
}

/// An instance that goes back into service (a warm pool, instance reuse) after a termination was
/// backed up is backed up again at its next termination (the watcher used to report
/// `Terminated` once per process, and the runner to answer with the old result).
#[test]
fn an_instance_back_in_service_is_backed_up_again_at_its_next_termination() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "reuse", 60);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"x\n");
    let bucket = server.bucket("reuse");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, ""),
    );
    let daemon = start_daemon(&lb, &imds, &[]);
    scale_in(server, &group);
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);
    assert_eq!(finished_action(server, &instance)["result"], "CONTINUE");
    let manifests = || {
        server
            .keys(&bucket)
            .into_iter()
            .filter(|k| k.ends_with(".manifest.json"))
            .count()
    };
    eventually("the first archive", Duration::from_secs(60), || {
        (manifests() >= 1).then_some(())
    });
    // Back in service (moto cannot return the instance to its group: only the second backup is
    // checked here; completing it is the unit tests' part), then terminating again.
    imds.set(r#"{"target_lifecycle_state": "Warmed:Running"}"#);
    // The daemon must poll at least once while the instance is back in service.
    let log_seen = || {
        let (_, log) = crate::support::http("GET", &format!("{}/_emulator/log", imds.endpoint), "");
        log.matches("target-lifecycle-state").count()
    };
    let polls = log_seen();
    eventually("two more metadata polls", Duration::from_secs(30), || {
        (log_seen() >= polls + 2).then_some(())
    });
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);
    eventually("the second archive", Duration::from_secs(60), || {
        (manifests() >= 2).then_some(())
    });
    assert_eq!(manifests(), 2);
    assert_eq!(stop_daemon(daemon).code, Some(0));
}
