//! Failure paths: non-zero exit, a message that says what failed, and no multipart upload left
//! open. Each test names the server whose behaviour it relies on.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::support::{Lifeboat, config_for, moto, noise, s3s_fs, wait_output, write};

fn small_tree(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("data");
    write(&data.join("a.log"), b"hello\n");
    data
}

#[test]
fn s3_unreachable_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_tree(dir.path());
    // Nothing listens on the discard port.
    let lb = Lifeboat::new(
        dir.path(),
        "http://127.0.0.1:9",
        &config_for("lb-nowhere", &[&data], "", ""),
    );
    let out = lb.run(&["backup"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("backup failed"), "{out:#?}");
    assert!(out.stderr.contains("s3://lb-nowhere/backups/"), "{out:#?}");
    assert!(
        out.stdout.is_empty(),
        "nothing reported as stored: {out:#?}"
    );
}

#[test]
fn missing_bucket_fails_and_names_it() {
    // moto answers NoSuchBucket like S3 (s3s-fs would create the bucket).
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let data = small_tree(dir.path());
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for("lb-no-such-bucket", &[&data], "", ""),
    );
    let out = lb.run(&["backup"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("NoSuchBucket"), "{out:#?}");
    assert!(out.stderr.contains("lb-no-such-bucket"), "{out:#?}");
}

#[test]
fn access_denied_fails_and_leaves_nothing() {
    // s3s-fs checks SigV4: a wrong secret key is refused like an IAM denial.
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let data = small_tree(dir.path());
    let bucket = server.bucket("denied");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[&data], "", ""),
    )
    .with_secret("not-the-secret");
    let out = lb.run(&["backup"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains(&format!("s3://{bucket}/")), "{out:#?}");
    assert!(out.stderr.contains("Signature"), "{out:#?}");
    assert!(server.keys(&bucket).is_empty());
}

#[test]
fn sigterm_mid_upload_aborts_the_multipart_upload() {
    // moto implements ListMultipartUploads, so it shows whether an upload was left open.
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Incompressible data, stored uncompressed in 5 MiB parts one at a time: many parts.
    write(
        &data.join("big.bin"),
        &noise(160 << 20, 0x9E37_79B9_7F4A_7C15),
    );
    let bucket = server.bucket("sigterm");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(
            &bucket,
            &[&data],
            "compression = \"none\"",
            "part_size = \"5MiB\"\nconcurrency = 1",
        ),
    );
    let child = lb.command(&["backup"]).spawn().unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.open_uploads(&bucket) == 0 {
        assert!(
            Instant::now() < deadline,
            "the multipart upload never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = wait_output(child, Duration::from_secs(60), &["backup"]);
    assert_eq!(out.code, Some(143), "{out:#?}");
    assert!(out.stderr.contains("interrupted"), "{out:#?}");
    assert_eq!(server.open_uploads(&bucket), 0, "an upload was left open");
    // Nothing may look stored: at most the job's own log (src/joblog.rs) says what happened.
    let keys = server.keys(&bucket);
    assert!(keys.iter().all(|k| k.ends_with(".log")), "{keys:?}");
}

#[test]
fn off_ec2_a_silent_metadata_endpoint_does_not_hold_the_backup() {
    // A metadata endpoint that accepts connections and never answers (a hop-limit black hole).
    let blackhole = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = blackhole.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in blackhole.incoming().take(8) {
            conns.push(c);
        }
    });
    let server = s3s_fs();
    let dir = tempfile::tempdir().unwrap();
    let data = small_tree(dir.path());
    let bucket = server.bucket("blackhole");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &config_for(&bucket, &[&data], "", ""),
    );
    let mut cmd = lb.command(&["backup"]);
    cmd.env(
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        format!("http://127.0.0.1:{port}"),
    );
    let out = wait_output(cmd.spawn().unwrap(), Duration::from_secs(30), &["backup"]);
    let key = out.stored_key();
    assert!(key.starts_with("backups/standalone/"), "{key}");
    drop(held);
}
