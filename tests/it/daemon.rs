//! The daemon and the lifecycle: a real Auto Scaling group in moto (extended with lifecycle
//! actions), an IMDSv2 emulator, `lifeboat run` as a process; scale-in → backup → heartbeats →
//! completion → SNS report. And the SSM entry point, `backup --complete-lifecycle`.

use std::time::Duration;

use crate::support::{
    Imds, Lifeboat, daemon_config, eventually, fault, finished_action, group_with_hook, http, moto,
    noise, notifications, partial_manifest_before, rt, scale_in, spot_time, start_daemon,
    stop_daemon, unix_now, wait_output, write,
};

#[test]
fn scale_in_is_backed_up_heartbeated_reported_and_completed() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "scalein", 60);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Incompressible and stored in 5 MiB parts one at a time: the job lasts a few seconds, long
    // enough for one-second heartbeats.
    write(
        &data.join("state.db"),
        &noise(48 << 20, 0x2545_F491_4F6C_DD1D),
    );
    let bucket = server.bucket("daemon");
    fault(
        server,
        &format!(r#"{{"bucket": "{bucket}", "s3_part_delay_ms": 300}}"#),
    );
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, ""),
    );
    let mut cmd = lb.command(&["run"]);
    cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint);
    let daemon = crate::support::Daemon::new(cmd.spawn().unwrap());
    let socket = dir.path().join("run/control.sock");
    eventually(
        "the daemon's control socket",
        Duration::from_secs(30),
        || socket.exists().then_some(()),
    );

    // Scale in: the instance waits in Terminating:Wait; metadata says Terminated.
    rt().block_on(
        server
            .autoscaling()
            .set_desired_capacity()
            .auto_scaling_group_name(&group)
            .desired_capacity(0)
            .send(),
    )
    .unwrap();
    let noticed_from = unix_now();
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);

    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    assert_eq!(action["ended_by"], "completed", "{action:#}");
    // Within poll interval (1 s) + backup time + 2 s.
    let state_file = dir.path().join("state/state.json");
    let backup_s = eventually(
        "the job's result in state.json",
        Duration::from_secs(30),
        || {
            let state: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state_file).ok()?).ok()?;
            state["last_job"]["duration_seconds"].as_f64()
        },
    );
    let took = action["ended"].as_f64().unwrap() - noticed_from;
    assert!(
        took <= 1.0 + backup_s + 2.0,
        "completed {took:.2} s after the notice, backup {backup_s:.2} s"
    );
    let calls = action["calls"].as_array().unwrap();
    let beats = calls
        .iter()
        .filter(|c| c["operation"] == "RecordLifecycleActionHeartbeat")
        .count();
    assert!(beats >= 1, "no heartbeat while the job ran: {action:#}");
    let last = calls.last().unwrap();
    assert_eq!(last["operation"], "CompleteLifecycleAction");
    // target-lifecycle-state carries no token: completion goes by instance id.
    assert_eq!(last["instance_id"], instance.as_str());

    // The archive and its manifest are in S3 under the group and instance.
    let keys = server.keys(&bucket);
    let prefix = crate::support::instance_prefix(&group, &instance);
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&prefix) && k.ends_with("-terminate.tar")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.ends_with(".manifest.json")),
        "{keys:?}"
    );

    // The SNS report, with the attributes subscription filters use.
    let sent = reports(server, &topic);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let (subject, message, attributes) = &sent[0];
    assert_eq!(
        subject,
        &format!("lifeboat: backup succeeded on {instance} ({group})")
    );
    assert_eq!(message["status"], "succeeded");
    assert_eq!(message["lifecycle_result"], "CONTINUE");
    assert!(
        message["object_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("s3://{bucket}/{prefix}"))
    );
    assert_eq!(attributes["status"]["Value"], "succeeded", "{attributes}");
    assert_eq!(
        attributes["instance_id"]["Value"],
        instance.as_str(),
        "{attributes}"
    );
    // The report names the manifest, the files that changed while read, and the job's own log,
    // kept beside the archive: the story of the backup outlives the instance.
    let object_url = message["object_url"].as_str().unwrap();
    let stem = object_url.strip_suffix(".tar").unwrap();
    assert_eq!(message["manifest_url"], format!("{stem}.manifest.json"));
    assert_eq!(message["changed"], 0, "{message}");
    assert_eq!(message["log_url"], format!("{stem}.log"), "{message}");
    let log_key = format!("{stem}.log")
        .strip_prefix(&format!("s3://{bucket}/"))
        .unwrap()
        .to_owned();
    let log = String::from_utf8(server.get(&bucket, &log_key)).unwrap();
    for line in [
        "INFO backup started",
        "INFO lifecycle action",
        "INFO job ended",
    ] {
        assert!(
            log.contains(line),
            "{line:?} missing from the job log:\n{log}"
        );
    }

    // A later trigger for the same termination (the SSM document) gets the same result, and no
    // second archive is made.
    let again = lb.run(&[
        "backup",
        "--complete-lifecycle",
        "--hook",
        "lifeboat",
        "--asg",
        &group,
        "--instance-id",
        &instance,
    ]);
    let text = again.ok();
    assert!(
        text.contains(&format!("stored s3://{bucket}/{prefix}")),
        "{again:#?}"
    );
    assert_eq!(server.keys(&bucket).len(), keys.len());

    // status tells the story.
    let status = lb.run(&["status"]);
    let text = status.ok();
    assert!(text.contains("daemon: running"), "{text}");
    assert!(text.contains("last job: Succeeded"), "{text}");
    assert!(text.contains("completed with CONTINUE"), "{text}");

    // SIGTERM while idle: a clean exit, and no talk of an upload that does not exist.
    let out = daemon.stop();
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(!out.stderr.contains("abort"), "{}", out.stderr);
}

#[test]
fn failed_backup_completes_with_the_configured_result_and_reports_why() {
    // The SSM document's entry point, without a daemon: the bucket does not exist, so the job
    // fails, the action is completed with ABANDON (configured) and the report says why.
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "abandon", 60);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"x\n");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(
            "lb-missing-bucket",
            &data,
            &topic,
            "on_failure = \"ABANDON\"",
        ),
    );
    rt().block_on(
        server
            .autoscaling()
            .set_desired_capacity()
            .auto_scaling_group_name(&group)
            .desired_capacity(0)
            .send(),
    )
    .unwrap();
    let token = eventually("the lifecycle action", Duration::from_secs(30), || {
        server
            .actions()
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["instance_id"] == instance.as_str())
            .map(|a| a["token"].as_str().unwrap().to_owned())
    });
    let out = lb.run(&[
        "backup",
        "--reason",
        "scale-in",
        "--complete-lifecycle",
        "--hook",
        "lifeboat",
        "--asg",
        &group,
        "--token",
        &token,
        "--instance-id",
        &instance,
    ]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("NoSuchBucket"), "{out:#?}");
    assert!(out.stdout.contains("completed with ABANDON"), "{out:#?}");
    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "ABANDON", "{action:#}");
    let last = action["calls"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        last["token"],
        token.as_str(),
        "completion used the token: {action:#}"
    );
    let sent = reports(server, &topic);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].1["status"], "failed");
    assert!(
        sent[0].1["error"]
            .as_str()
            .unwrap()
            .contains("NoSuchBucket")
    );
    assert!(
        sent[0].0.starts_with("lifeboat: backup failed on"),
        "{}",
        sent[0].0
    );
}

#[test]
fn run_off_ec2_waits_for_metadata_then_exits_5() {
    let dir = tempfile::tempdir().unwrap();
    let lb = Lifeboat::new(
        dir.path(),
        "http://127.0.0.1:9",
        "[s3]\nbucket = \"b-1\"\n[watch]\nmetadata_wait = \"3s\"\n",
    );
    let out = lb.run_with_limit(&["run"], Duration::from_secs(60));
    assert_eq!(out.code, Some(5), "{out:#?}");
    assert!(
        out.stderr.contains("waiting for instance metadata"),
        "{out:#?}"
    );
    assert!(
        out.stderr
            .contains("instance metadata did not answer within 3s"),
        "{out:#?}"
    );
}

#[test]
fn throttled_heartbeats_and_completion_still_complete() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "throttle", 60);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("db"), &noise(20 << 20, 7));
    let bucket = server.bucket("throttle");
    // A slowed S3 keeps the job running long enough for heartbeats.
    fault(
        server,
        &format!(r#"{{"bucket": "{bucket}", "s3_part_delay_ms": 700}}"#),
    );
    fault(
        server,
        &format!(
            r#"{{"group": "{group}", "throttle": {{"RecordLifecycleActionHeartbeat": 3, "CompleteLifecycleAction": 4}}}}"#
        ),
    );
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, ""),
    );
    let daemon = start_daemon(&lb, &imds, &[]);
    scale_in(server, &group);
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);
    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    assert_eq!(action["ended_by"], "completed", "{action:#}");
    let (_, body) = http(
        "GET",
        &format!("{}/throttled", server.control.as_ref().unwrap()),
        "",
    );
    let throttled: serde_json::Value = serde_json::from_str(&body).unwrap();
    let count = |op: &str| {
        throttled
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["group"] == group.as_str() && t["operation"] == op)
            .count()
    };
    assert_eq!(count("CompleteLifecycleAction"), 4, "{throttled:#}");
    assert!(
        count("RecordLifecycleActionHeartbeat") >= 1,
        "{throttled:#}"
    );
    assert_eq!(stop_daemon(daemon).code, Some(0));
}

#[test]
fn s3_down_still_completes_with_on_failure_and_reports_why() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "s3down", 60);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"x\n");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config("lb-s3-down", &data, &topic, "on_failure = \"ABANDON\"")
            .replace("concurrency = 1", "concurrency = 1\nretry_budget = \"10s\""),
    );
    // S3 is a closed port; Auto Scaling and SNS still answer.
    let daemon = start_daemon(&lb, &imds, &[("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")]);
    scale_in(server, &group);
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);
    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "ABANDON", "{action:#}");
    assert_eq!(action["ended_by"], "completed", "{action:#}");
    let took = action["ended"].as_f64().unwrap() - action["started"].as_f64().unwrap();
    assert!(
        took < 10.0 + 10.0,
        "completion took {took:.1} s with a 10 s retry budget"
    );
    let sent = reports(server, &topic);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].1["status"], "failed");
    assert!(
        sent[0].1["error"]
            .as_str()
            .unwrap()
            .contains("s3://lb-s3-down/"),
        "{sent:?}"
    );
    assert_eq!(sent[0].1["lifecycle_result"], "ABANDON");
    assert_eq!(stop_daemon(daemon).code, Some(0));
}

#[test]
fn sns_down_does_not_block_completion() {
    let server = moto();
    let (group, instance, _topic) = group_with_hook(server, "snsdown", 60);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"x\n");
    let bucket = server.bucket("snsdown");
    let topic = "arn:aws:sns:us-east-1:123456789012:nowhere";
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, topic, ""),
    );
    let daemon = start_daemon(
        &lb,
        &imds,
        &[("AWS_ENDPOINT_URL_SNS", "http://127.0.0.1:9")],
    );
    scale_in(server, &group);
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);
    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    let out = stop_daemon(daemon);
    assert!(out.stderr.contains("SNS report failed"), "{out:#?}");
}

#[test]
fn imds_flapping_neither_crashes_nor_misses_the_notice() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "flap", 60);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("a.log"), b"x\n");
    let bucket = server.bucket("flap");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, ""),
    );
    let daemon = start_daemon(&lb, &imds, &[]);
    let emulator = |json: &str| {
        assert_eq!(
            http("POST", &format!("{}/_emulator/fault", imds.endpoint), json).0,
            200
        );
    };
    emulator(r#"{"status": 503, "count": 3}"#);
    emulator(r#"{"drop": 2}"#);
    emulator(r#"{"expire_tokens": true}"#);
    emulator(r#"{"delay_ms": 3000, "count": 1}"#);
    scale_in(server, &group);
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);
    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    let (_, log) = http("GET", &format!("{}/_emulator/log", imds.endpoint), "");
    assert!(log.contains("503"), "the faults were served: {log}");
    // After the tokens were forgotten (401), the daemon started a new session.
    assert!(
        log.matches(r#""method": "PUT""#).count() >= 2,
        "no new token after 401: {log}"
    );
    assert_eq!(stop_daemon(daemon).code, Some(0));
}

#[test]
fn duplicate_triggers_make_exactly_one_archive() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "dupes", 60);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("db"), &noise(25 << 20, 11));
    let bucket = server.bucket("dupes");
    fault(
        server,
        &format!(r#"{{"bucket": "{bucket}", "s3_part_delay_ms": 600}}"#),
    );
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, ""),
    );
    let daemon = start_daemon(&lb, &imds, &[]);
    scale_in(server, &group);
    // IMDS, a Spot notice, and two SSM-style invocations, all at once.
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);
    let when = time::OffsetDateTime::now_utc() + time::Duration::minutes(10);
    let spot_time = when
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    imds.set(&format!(
        r#"{{"spot_action": {{"action": "terminate", "time": "{spot_time}"}}}}"#
    ));
    let args = [
        "backup",
        "--complete-lifecycle",
        "--hook",
        "lifeboat",
        "--asg",
        group.as_str(),
        "--instance-id",
        instance.as_str(),
    ];
    let calls: Vec<_> = (0..2).map(|_| lb.command(&args).spawn().unwrap()).collect();
    let outs: Vec<_> = calls
        .into_iter()
        .map(|c| wait_output(c, Duration::from_secs(120), &args))
        .collect();
    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    let archives: Vec<_> = server
        .keys(&bucket)
        .into_iter()
        .filter(|k| k.ends_with(".tar"))
        .collect();
    assert_eq!(archives.len(), 1, "{archives:?}");
    for out in outs {
        assert!(
            out.ok()
                .contains(&format!("stored s3://{bucket}/{}", archives[0])),
            "{out:#?}"
        );
    }
    let completions = action["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["operation"] == "CompleteLifecycleAction")
        .count();
    assert_eq!(completions, 1, "{action:#}");
    assert_eq!(stop_daemon(daemon).code, Some(0));
}

#[test]
fn spot_notice_too_short_for_the_data_gives_a_valid_partial_archive_in_time() {
    let server = moto();
    let instance = crate::support::bucket_name("i-spot");
    let imds = Imds::start(&instance, "");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for i in 0..3 {
        write(
            &data.join(format!("part-{i}.bin")),
            &noise(40 << 20, 100 + i),
        );
    }
    let bucket = server.bucket("spot");
    // About 5 MB/s into S3: 120 MB would take 24 s, the notice gives 20.
    fault(
        server,
        &format!(r#"{{"bucket": "{bucket}", "s3_part_delay_ms": 1000}}"#),
    );
    let sns = server.sns();
    let topic = rt()
        .block_on(
            sns.create_topic()
                .name(crate::support::bucket_name("spot"))
                .send(),
        )
        .unwrap()
        .topic_arn()
        .unwrap()
        .to_owned();
    let config = daemon_config(&bucket, &data, &topic, "").replace("compression = \"none\"", "");
    let lb = Lifeboat::new(dir.path(), &server.endpoint, &config);
    let daemon = start_daemon(&lb, &imds, &[]);
    let (when, spot_time) = spot_time(20);
    imds.set(&format!(
        r#"{{"spot_action": {{"action": "terminate", "time": "{spot_time}"}}}}"#
    ));
    let manifest = partial_manifest_before(server, &bucket, when);
    assert_eq!(manifest["reason"], "spot-terminate");
    // The partial archive is valid: verify reads it whole.
    let key = manifest["key"].as_str().unwrap();
    let out = lb.run(&["verify", "--key", key]);
    assert!(out.ok().contains("partial"), "{out:#?}");
    let sent = reports(server, &topic);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].1["status"], "partial");
    assert_eq!(sent[0].1["partial"], true);
    assert_eq!(stop_daemon(daemon).code, Some(0));
}

#[test]
fn a_backup_longer_than_the_heartbeat_timeout_survives_by_heartbeats() {
    let server = moto();
    // AWS's smallest heartbeat timeout.
    let (group, instance, topic) = group_with_hook(server, "longjob", 30);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("db"), &noise(40 << 20, 5));
    let bucket = server.bucket("longjob");
    // Eight 5 MiB parts at 5 s each: 40 s, past the 30 s timeout.
    fault(
        server,
        &format!(r#"{{"bucket": "{bucket}", "s3_part_delay_ms": 5000}}"#),
    );
    let config =
        daemon_config(&bucket, &data, &topic, "").replace("heartbeat_interval = \"1s\"", "");
    let lb = Lifeboat::new(dir.path(), &server.endpoint, &config);
    let daemon = start_daemon(&lb, &imds, &[]);
    scale_in(server, &group);
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);
    let action = finished_action(server, &instance);
    assert_eq!(
        action["ended_by"], "completed",
        "timed out instead: {action:#}"
    );
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    let took = action["ended"].as_f64().unwrap() - action["started"].as_f64().unwrap();
    assert!(
        took > 30.0,
        "the job was not longer than the hook's timeout ({took:.1} s)"
    );
    let beats = action["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["operation"] == "RecordLifecycleActionHeartbeat")
        .count();
    assert!(beats >= 2, "{action:#}");
    assert_eq!(stop_daemon(daemon).code, Some(0));
}

/// The reports on `topic`, once there is one: a report follows the completion by the time it
/// takes to store the job's log (at most a few seconds when S3 is down).
fn reports(
    server: &crate::support::Server,
    topic: &str,
) -> Vec<(String, serde_json::Value, serde_json::Value)> {
    crate::support::eventually("a report", Duration::from_secs(30), || {
        Some(notifications(server, topic)).filter(|s| !s.is_empty())
    })
}

/// The configuration from a Parameter Store parameter (`LIFEBOAT_CONFIG=ssm:NAME`, a
/// SecureString): `config check` reads it; the daemon runs with it, takes a new version on
/// SIGHUP, keeps the running configuration when the parameter turns invalid, and boots from its
/// cached copy when SSM is unreachable.
#[test]
fn config_from_parameter_store_is_reloaded_kept_when_bad_and_cached_for_boot() {
    let server = moto();
    let (group, instance, _topic) = group_with_hook(server, "ssm-config", 300);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.db"), b"configured remotely");
    let bucket = server.bucket("ssm-config");
    let name = format!("/lifeboat/ssm-config-{}", std::process::id());
    let put = |prefix: &str, raw: Option<&str>| {
        let value = raw.map(str::to_owned).unwrap_or_else(|| {
            format!(
                "[backup]\npaths = [{:?}]\n[s3]\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\n",
                data.display().to_string()
            )
        });
        rt().block_on(
            server
                .ssm()
                .put_parameter()
                .name(&name)
                .value(value)
                .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
                .overwrite(true)
                .send(),
        )
        .unwrap();
    };
    put("v1/", None);
    let source = format!("ssm:{name}");
    let lb = Lifeboat::new(dir.path(), &server.endpoint, "");
    let with_source = |args: &[&str]| {
        let mut cmd = lb.command(args);
        cmd.env("LIFEBOAT_CONFIG", &source);
        cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint);
        wait_output(cmd.spawn().unwrap(), Duration::from_secs(120), args)
    };
    let check = with_source(&["--json", "config", "show"]);
    let doc: serde_json::Value = serde_json::from_str(check.stdout.trim()).unwrap();
    assert_eq!(doc["source"], source.as_str(), "{check:#?}");
    assert_eq!(doc["config"]["s3"]["prefix"], "v1/");
    assert_eq!(doc["origins"]["s3.bucket"], source.as_str());

    let daemon = start_daemon(&lb, &imds, &[("LIFEBOAT_CONFIG", &source)]);
    let status = || -> serde_json::Value {
        serde_json::from_str(with_source(&["--json", "status"]).stdout.trim()).unwrap()
    };
    let running_version = |v: &str| {
        eventually(
            &format!("the daemon to run version {v}"),
            Duration::from_secs(30),
            || {
                let s = status();
                s["daemon"]["config"]
                    .as_str()
                    .is_some_and(|c| {
                        c.contains(&format!("version {v})")) && s["daemon_running"] == true
                    })
                    .then_some(())
            },
        )
    };
    running_version("1");
    let hangup = |d: &mut crate::support::Daemon| {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &d.child().id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    // A new version, read on SIGHUP: the next backup goes where it says.
    let mut daemon = daemon;
    put("v2/", None);
    hangup(&mut daemon);
    running_version("2");
    let key = with_source(&["backup"]).stored_key();
    assert!(key.starts_with(&format!("v2/{group}/")), "{key}");

    // A bad value is rejected and the running configuration kept. (This command reads a file
    // with another prefix: its own configuration from the parameter is now invalid, and the
    // job it asks for runs in the daemon, with the daemon's.)
    put("", Some("[s3]\nbucket = \"-my..backups-\"\n"));
    hangup(&mut daemon);
    let file = dir.path().join("v2.toml");
    std::fs::write(
        &file,
        format!(
            "[backup]\npaths = [{:?}]\n[s3]\nbucket = \"{bucket}\"\nprefix = \"cli/\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let via_file = || {
        let mut cmd = lb.command(&["--config", file.to_str().unwrap(), "backup"]);
        cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint);
        wait_output(cmd.spawn().unwrap(), Duration::from_secs(120), &["backup"]).stored_key()
    };
    let key = via_file();
    assert!(key.starts_with("v2/"), "{key}");
    let out = stop_daemon(daemon);
    assert!(
        out.stderr.contains("keeping the running configuration"),
        "{out:#?}"
    );

    // SSM unreachable at boot: the cached copy (the last good version) is used.
    let daemon = start_daemon(
        &lb,
        &imds,
        &[
            ("LIFEBOAT_CONFIG", &source),
            ("AWS_ENDPOINT_URL_SSM", "http://127.0.0.1:9"),
        ],
    );
    running_version("cached");
    let key = via_file();
    assert!(key.starts_with("v2/"), "{key}");
    let out = stop_daemon(daemon);
    assert!(out.stderr.contains("using the cached copy"), "{out:#?}");
}

/// `lifeboat status` during a slow backup says where it is: bytes read, the percent and the
/// time left against the previous backup's size, and the rate.
#[test]
fn status_during_a_slow_backup_shows_percent_and_eta() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "status-progress", 300);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("big.bin"), &noise(30 << 20, 11));
    let bucket = server.bucket("status-progress");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, ""),
    );
    let _daemon = start_daemon(&lb, &imds, &[]);
    // The first backup sets the size the next one is measured against.
    lb.run(&["backup", "--reason", "first"]).stored_key();
    // Six parts of 5 MiB, each held 1.5 s: the next backup takes about ten seconds.
    fault(
        server,
        &format!(r#"{{"bucket": "{bucket}", "s3_part_delay_ms": 1500}}"#),
    );
    let backup = lb
        .command(&["backup", "--reason", "second"])
        .spawn()
        .unwrap();
    let job = eventually(
        "status to show the running job's percent",
        Duration::from_secs(60),
        || {
            let out = lb.run(&["--json", "status"]);
            let s: serde_json::Value = serde_json::from_str(out.stdout.trim()).ok()?;
            let job = s["job"].clone();
            (job["percent"].as_u64().is_some_and(|p| p > 0) && s["job_running"] == true)
                .then_some(job)
        },
    );
    assert_eq!(job["reason"], "second", "{job}");
    assert_eq!(job["phase"], "archiving", "{job}");
    assert_eq!(job["expected_bytes"], 30 << 20, "{job}");
    assert!(job["percent"].as_u64().unwrap() <= 99, "{job}");
    assert!(
        job["eta_seconds"].is_u64() && job["rate"].as_u64().unwrap() > 0,
        "{job}"
    );
    let text = lb.run(&["status"]);
    assert!(
        text.stdout.contains("job: archiving (second): ")
            && text.stdout.contains("%)")
            && text.stdout.contains("ETA"),
        "{text:#?}"
    );
    let done = wait_output(backup, Duration::from_secs(120), &["backup"]);
    assert_eq!(done.code, Some(0), "{done:#?}");
}
