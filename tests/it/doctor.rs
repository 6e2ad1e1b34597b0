//! `lifeboat doctor` against the loopback bench: everything in place gives ok on every line and
//! exit 0; a missing bucket, no topic and no instance metadata each give their FAIL or WARN line
//! with the fix, and exit 3.

use std::time::Duration;

use crate::support::{
    Imds, Lifeboat, Run, daemon_config, group_with_hook, moto, wait_output, write,
};

fn doctor(lb: &Lifeboat, imds: Option<&Imds>) -> Run {
    let mut cmd = lb.command(&["doctor"]);
    if let Some(imds) = imds {
        cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint);
    }
    wait_output(cmd.spawn().unwrap(), Duration::from_secs(120), &["doctor"])
}

#[test]
fn doctor_is_all_ok_on_a_protected_instance() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "doctor-ok", 300);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.log"), &vec![b'x'; 10_000]);
    let bucket = server.bucket("doctor-ok");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, ""),
    );
    let out = doctor(&lb, Some(&imds));
    let text = out.stdout.clone();
    assert_eq!(out.code, Some(0), "{out:#?}");
    for name in [
        "instance metadata (IMDSv2)",
        "credentials",
        "bucket writable under the prefix",
        "report topic",
        "trust store",
        "group and terminate hook",
        "time for the data",
        "memory budget",
    ] {
        assert!(
            text.contains(&format!("  ok    {name}: ")),
            "{name}:\n{text}"
        );
    }
    assert!(text.contains(&format!(
        "group {group}, hook lifeboat (heartbeat timeout 300 s"
    )));
    // It says where this instance's archives go: under its ARN, where the instance policy allows.
    let arn_prefix = crate::support::instance_prefix(&group, &instance);
    assert!(
        text.contains(&format!("archives go under {arn_prefix}")),
        "{text}"
    );
    // The probe left no upload behind.
    assert_eq!(server.open_uploads(&bucket), 0);
    // With instance metadata tags off (EC2's default), the group still comes out right.
    imds.set(r#"{"tags_enabled": false}"#);
    let out = doctor(&lb, Some(&imds));
    assert!(
        out.stdout
            .contains(&format!("archives go under {arn_prefix}")),
        "{out:#?}"
    );
}

#[test]
fn doctor_names_each_failure_with_its_fix() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.log"), b"x");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &format!(
            "[backup]\npaths = [{:?}]\n[s3]\nbucket = \"no-such-bucket-for-doctor\"\n",
            data.display().to_string()
        ),
    );
    // Off EC2 (nothing answers metadata), no such bucket, no topic.
    let out = doctor(&lb, None);
    let text = out.stdout.clone();
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(
        text.contains("  FAIL  instance metadata (IMDSv2): no IMDSv2 answer"),
        "{text}"
    );
    assert!(text.contains("--http-put-response-hop-limit 2"), "{text}");
    assert!(
        text.contains("  FAIL  bucket writable under the prefix"),
        "{text}"
    );
    assert!(text.contains("NoSuchBucket"), "{text}");
    assert!(
        text.contains("fix: create the bucket no-such-bucket-for-doctor"),
        "{text}"
    );
    assert!(
        text.contains("  WARN  report topic: no sns.topic_arn"),
        "{text}"
    );
    assert!(
        text.contains("  FAIL  group and terminate hook: skipped"),
        "{text}"
    );
    assert!(text.contains("  ok    credentials"), "{text}");
}

/// A root without CA certificates (a minimal image without `ca-certificates`): doctor says
/// so, and how to fix it, instead of every AWS call failing later.
#[test]
fn doctor_names_a_missing_trust_store() {
    let server = moto();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.log"), b"x");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &format!(
            "[backup]\npaths = [{:?}]\n[s3]\nbucket = \"no-such-bucket-for-doctor\"\n",
            data.display().to_string()
        ),
    );
    let mut cmd = lb.command(&["doctor"]);
    cmd.env("SSL_CERT_FILE", &empty);
    let out = wait_output(cmd.spawn().unwrap(), Duration::from_secs(120), &["doctor"]);
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(
        out.stdout
            .contains("  FAIL  trust store: no root CA certificates")
            && out.stdout.contains("install the ca-certificates package"),
        "{out:#?}"
    );
    // A backup says the same and exits 1 (the SDK used to panic building its client).
    let mut cmd = lb.command(&["backup"]);
    cmd.env("SSL_CERT_FILE", &empty);
    let out = wait_output(cmd.spawn().unwrap(), Duration::from_secs(120), &["backup"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("no root CA certificates")
            && out.stderr.contains("install the ca-certificates package")
            && !out.stderr.contains("panicked"),
        "{out:#?}"
    );
}

/// Without credentials, doctor still runs every check that needs no AWS call, says why the
/// others did not run, and off EC2 gives a fix that fits there (no instance profile).
#[test]
fn without_credentials_doctor_runs_what_it_can_with_fixes_for_where_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.log"), b"x");
    let lb = Lifeboat::new(
        dir.path(),
        "http://127.0.0.1:9",
        &format!(
            "[backup]\npaths = [{:?}]\n[s3]\nbucket = \"no-credentials\"\n",
            data.display().to_string()
        ),
    );
    let mut cmd = lb.command(&["doctor"]);
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
        .env("AWS_CONFIG_FILE", dir.path().join("none"));
    let out = wait_output(cmd.spawn().unwrap(), Duration::from_secs(120), &["doctor"]);
    let text = &out.stdout;
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(text.contains("  FAIL  credentials: "), "{text}");
    assert!(
        text.contains("off EC2 there is no instance profile"),
        "{text}"
    );
    assert!(
        text.contains("  FAIL  bucket writable under the prefix: skipped: no credentials"),
        "{text}"
    );
    assert!(text.contains("  ok    time for the data: "), "{text}");
    assert!(text.contains("  ok    memory budget: "), "{text}");
}
