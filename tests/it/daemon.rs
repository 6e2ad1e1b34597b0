//! The daemon and the lifecycle: a real Auto Scaling group in moto (extended with lifecycle
//! actions), an IMDSv2 emulator, `lifeboat run` as a process; scale-in → backup → heartbeats →
//! completion → SNS report. And the SSM entry point, `backup --complete-lifecycle`.

use std::time::Duration;

use crate::support::{Imds, Lifeboat, Server, eventually, http, moto, rt, wait_output, write};

/// A group with one instance and a terminate hook; returns (group, instance id, topic ARN).
fn group_with_hook(
    server: &Server,
    name: &str,
    heartbeat_timeout: i32,
) -> (String, String, String) {
    let asg = server.autoscaling();
    let group = crate::support::bucket_name(name);
    rt().block_on(async {
        asg.create_launch_configuration()
            .launch_configuration_name(&group)
            .image_id("ami-12c6146b")
            .instance_type("t3.micro")
            .send()
            .await
            .unwrap();
        asg.create_auto_scaling_group()
            .auto_scaling_group_name(&group)
            .launch_configuration_name(&group)
            .min_size(0)
            .max_size(2)
            .desired_capacity(1)
            .availability_zones("us-east-1a")
            .send()
            .await
            .unwrap();
        asg.put_lifecycle_hook()
            .auto_scaling_group_name(&group)
            .lifecycle_hook_name("lifeboat")
            .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
            .heartbeat_timeout(heartbeat_timeout)
            .default_result("ABANDON")
            .send()
            .await
            .unwrap();
    });
    let instance = rt()
        .block_on(
            asg.describe_auto_scaling_groups()
                .auto_scaling_group_names(&group)
                .send(),
        )
        .unwrap()
        .auto_scaling_groups()[0]
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned();
    let topic = rt()
        .block_on(server.sns().create_topic().name(&group).send())
        .unwrap()
        .topic_arn()
        .unwrap()
        .to_owned();
    (group, instance, topic)
}

/// The lifecycle action of `instance` once it has a result.
fn finished_action(server: &Server, instance: &str) -> serde_json::Value {
    eventually(
        "the lifecycle action to end",
        Duration::from_secs(120),
        || {
            server
                .actions()
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["instance_id"] == instance && !a["result"].is_null())
                .cloned()
        },
    )
}

/// SNS messages moto holds for `topic`: (subject, message JSON, attributes).
fn notifications(
    server: &Server,
    topic: &str,
) -> Vec<(String, serde_json::Value, serde_json::Value)> {
    // moto's data.json answers 500 while any multipart upload has parts: poll past that.
    let body = eventually("moto's data.json", Duration::from_secs(60), || {
        let (status, body) = http(
            "GET",
            &format!("{}/moto-api/data.json", server.endpoint),
            "",
        );
        (status == 200).then_some(body)
    });
    let data: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut out = Vec::new();
    for t in data["sns"]["Topic"].as_array().into_iter().flatten() {
        if t["arn"] != topic {
            continue;
        }
        for n in t["sent_notifications"].as_array().into_iter().flatten() {
            let message = serde_json::from_str(n[1].as_str().unwrap()).unwrap();
            out.push((
                n[2].as_str().unwrap_or_default().to_owned(),
                message,
                n[3].clone(),
            ));
        }
    }
    out
}

fn daemon_config(bucket: &str, data: &std::path::Path, topic: &str, extra: &str) -> String {
    format!(
        "[backup]\npaths = [{:?}]\ncompression = \"none\"\n[s3]\nbucket = \"{bucket}\"\nprefix = \"backups/\"\npart_size = \"5MiB\"\nconcurrency = 1\n[sns]\ntopic_arn = \"{topic}\"\n[lifecycle]\nheartbeat_interval = \"1s\"\n{extra}\n[watch]\npoll_interval = \"1s\"\n",
        data.display().to_string()
    )
}

#[test]
fn scale_in_is_backed_up_heartbeated_reported_and_completed() {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, "scalein", 60);
    let imds = Imds::start(&instance, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Incompressible and stored in 5 MiB parts one at a time: the job lasts a few seconds, long
    // enough for one-second heartbeats.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let blob: Vec<u8> = (0..48 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    write(&data.join("state.db"), &blob);
    let bucket = server.bucket("daemon");
    let lb = Lifeboat::new(
        dir.path(),
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, ""),
    );
    let mut cmd = lb.command(&["run"]);
    cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint);
    let daemon = cmd.spawn().unwrap();
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
    imds.set(r#"{"target_lifecycle_state": "Terminated"}"#);

    let action = finished_action(server, &instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    assert_eq!(action["ended_by"], "completed", "{action:#}");
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
    let prefix = format!("backups/{group}/{instance}/");
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
    let sent = notifications(server, &topic);
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

    // SIGTERM: a clean exit.
    let pid = daemon.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = wait_output(daemon, Duration::from_secs(60), &["run"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
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
    let sent = notifications(server, &topic);
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
fn run_off_ec2_says_so_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let lb = Lifeboat::new(dir.path(), "http://127.0.0.1:9", "[s3]\nbucket = \"b-1\"\n");
    let out = lb.run_with_limit(&["run"], Duration::from_secs(60));
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(
        out.stderr.contains("instance metadata is not available"),
        "{out:#?}"
    );
}
