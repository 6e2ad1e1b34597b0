//! The Run Command path: moto (with lifecycle actions and the SSM agent stand-in that really runs
//! the project's document), the companion Lambda's `bootstrap` under a local Runtime API, and
//! `lifeboat backup --complete-lifecycle` run by the stand-in. moto plays EventBridge: a group's
//! lifecycle events and its commands' status changes are posted to the Lambda as async events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    Imds, LambdaRuntime, Lifeboat, Server, control, daemon_config, eventually, finished_action,
    group_of, group_with_hook, http, instance_prefix, moto, notifications, root, rt, scale_in,
    ssm_commands, write,
};

/// A group with a waiting-to-be-terminated instance, the document, the Lambda and the stand-in.
struct Bench {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    group: String,
    instance: String,
    topic: String,
    bucket: String,
    document: String,
    lambda: LambdaRuntime,
    lb: Lifeboat,
}

/// Registers the document under a name of this test's own (moto is shared).
fn create_document(server: &Server, name: &str) {
    let content =
        std::fs::read_to_string(root().join("ssm-documents/lifeboat-backup.json")).unwrap();
    rt().block_on(
        server
            .ssm()
            .create_document()
            .name(name)
            .content(content)
            .document_type(aws_sdk_ssm::types::DocumentType::Command)
            .document_format(aws_sdk_ssm::types::DocumentFormat::Json)
            .send(),
    )
    .unwrap();
}

fn bench(test: &str, group_name: &str, lambda_env: &[(&str, &str)]) -> Bench {
    bench_timed(test, group_name, lambda_env, 30)
}

/// [`bench`] with a function timeout of `timeout_s` seconds.
fn bench_timed(test: &str, group_name: &str, lambda_env: &[(&str, &str)], timeout_s: u32) -> Bench {
    let server = moto();
    let (group, instance, topic) = group_with_hook(server, group_name, 60);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let data = path.join("data");
    write(&data.join("app.log"), b"precious\n");
    let bucket = server.bucket(test);
    let lb = Lifeboat::new(
        &path,
        &server.endpoint,
        &daemon_config(&bucket, &data, &topic, "on_failure = \"ABANDON\""),
    );
    let document = crate::support::bucket_name(&format!("doc-{test}"));
    create_document(server, &document);
    let mut env = vec![
        ("LIFEBOAT_DOCUMENT", document.as_str()),
        ("LIFEBOAT_SNS_TOPIC_ARN", topic.as_str()),
        ("LIFEBOAT_ON_FAILURE", "ABANDON"),
    ];
    env.extend_from_slice(lambda_env);
    let lambda = LambdaRuntime::start_with_timeout(server, &env, timeout_s);
    control(
        server,
        "/events",
        &json!({ "group": group, "url": lambda.events_url() }),
    );
    Bench {
        _dir: dir,
        dir: path,
        group,
        instance,
        topic,
        bucket,
        document,
        lambda,
        lb,
    }
}

impl Bench {
    /// Makes the instance SSM-managed: the stand-in runs its commands with `path` as PATH.
    fn register(&self, path: &str, extra: Value) {
        let env: serde_json::Map<String, Value> = self
            .lb
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect();
        let mut agent = json!({
            "instance_id": self.instance,
            "env": env,
            "path": path,
            "cwd": self.dir,
            "events_url": self.lambda.events_url(),
        });
        agent
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        control(moto(), "/ssm/agents", &agent);
    }

    /// PATH with the built `lifeboat` first.
    fn path_with_lifeboat() -> String {
        let bin = Path::new(env!("CARGO_BIN_EXE_lifeboat")).parent().unwrap();
        format!("{}:/usr/bin:/bin", bin.display())
    }

    /// Outcomes of the Lambda's finished invocations, in order.
    fn outcomes(&self) -> Vec<Value> {
        self.lambda
            .invocations()
            .into_iter()
            .filter(|i| i["ok"] == true)
            .map(|i| i["result"].clone())
            .collect()
    }

    /// Waits for an invocation whose outcome is `kind`.
    fn outcome(&self, kind: &str) -> Value {
        eventually(
            &format!("a Lambda outcome {kind:?}"),
            Duration::from_secs(120),
            || self.outcomes().into_iter().find(|o| o["outcome"] == kind),
        )
    }

    fn completions(&self, action: &Value) -> Vec<Value> {
        action["calls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["operation"] == "CompleteLifecycleAction" && c["outcome"].is_null())
            .cloned()
            .collect()
    }

    fn commands(&self) -> Vec<Value> {
        ssm_commands(moto())
            .into_iter()
            .filter(|c| c["instance_id"] == self.instance)
            .collect()
    }

    /// SendCommand of the document to this instance, past the Lambda; the command id, or the
    /// error as text.
    fn send_command(&self, params: &[(&str, &str)]) -> Result<String, String> {
        let mut map = std::collections::HashMap::from([(
            "InstanceId".to_owned(),
            vec![self.instance.clone()],
        )]);
        map.extend(
            params
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_string()])),
        );
        rt().block_on(
            moto()
                .ssm()
                .send_command()
                .document_name(&self.document)
                .instance_ids(&self.instance)
                .set_parameters(Some(map))
                .send(),
        )
        .map(|out| out.command().unwrap().command_id().unwrap().to_owned())
        .map_err(|e| aws_sdk_ssm::error::DisplayErrorContext(&e).to_string())
    }

    /// Answers the next `n` SendCommand and ListCommands calls for this instance with
    /// ThrottlingException.
    fn throttle_ssm(&self, n: u32) {
        let faults =
            json!({ "instance_id": self.instance, "throttle_send": n, "throttle_list": n });
        control(moto(), "/ssm/faults", &faults);
    }

    /// Waits for an invocation that failed for Lambda to retry it; returns it.
    fn invocation_left_for_retry(&self) -> Value {
        let failed = eventually("the invocation to fail", Duration::from_secs(60), || {
            self.lambda
                .invocations()
                .into_iter()
                .find(|i| i["ok"] == false)
        });
        assert!(
            failed["error"]
                .to_string()
                .contains("left for Lambda's retry"),
            "{failed:#}"
        );
        failed
    }

    /// Lambda retries the `failed` invocation's event once SSM answers again: the command is
    /// sent, the agent backs up and completes CONTINUE, once.
    fn retry_backs_up(&self, failed: &Value) {
        self.throttle_ssm(0);
        let (status, _) = http(
            "POST",
            &self.lambda.events_url(),
            &failed["event"].to_string(),
        );
        assert_eq!(status, 202);
        self.outcome("sent");
        let action = finished_action(moto(), &self.instance);
        assert_eq!(action["result"], "CONTINUE", "{action:#}");
        assert_eq!(action["ended_by"], "completed", "{action:#}");
        assert_eq!(self.completions(&action).len(), 1, "{action:#}");
        let keys = moto().keys(&self.bucket);
        assert!(
            keys.iter().any(|k| k.ends_with("-scale-in.tar")),
            "{keys:?}"
        );
    }

    /// A lifecycle event for this instance, with `detail` fields overridden.
    fn event(&self, token: &str, overrides: Value) -> Value {
        let mut detail = json!({
            "LifecycleActionToken": token,
            "AutoScalingGroupName": self.group,
            "LifecycleHookName": "lifeboat",
            "EC2InstanceId": self.instance,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
            "Origin": "AutoScalingGroup",
            "Destination": "EC2",
        });
        detail
            .as_object_mut()
            .unwrap()
            .extend(overrides.as_object().unwrap().clone());
        json!({
            "version": "0", "id": "test", "source": "aws.autoscaling",
            "detail-type": "EC2 Instance-terminate Lifecycle Action",
            "account": "123456789012", "region": "us-east-1", "resources": [],
            "detail": detail,
        })
    }
}

#[test]
fn lifecycle_event_runs_the_document_and_the_agent_completes_continue() {
    let b = bench("lambda-e2e", "lambda-e2e", &[]);
    b.register(&Bench::path_with_lifeboat(), json!({}));
    scale_in(moto(), &b.group);

    let action = finished_action(moto(), &b.instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    assert_eq!(b.completions(&action).len(), 1, "{action:#}");
    let sent = b.outcome("sent");
    let command = eventually("the command to succeed", Duration::from_secs(60), || {
        b.commands().into_iter().find(|c| c["status"] == "Success")
    });
    assert_eq!(sent["command_id"], command["command_id"]);
    assert_eq!(command["statuses"], json!(["InProgress", "Success"]));
    let keys = moto().keys(&b.bucket);
    // The stand-in runs the agent without instance metadata: the key has the bare instance id.
    let prefix = format!("backups/{}/{}/", b.group, b.instance);
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&prefix) && k.ends_with("-scale-in.tar")),
        "{keys:?}"
    );
    // The Success status change reaches the Lambda and changes nothing.
    eventually("the Success event ignored", Duration::from_secs(30), || {
        b.outcomes().into_iter().find(|o| {
            o["outcome"] == "ignored" && o["why"].as_str().unwrap().ends_with("is Success")
        })
    });
    let reports = notifications(moto(), &b.topic);
    assert!(
        reports.iter().any(|(_, m, _)| m["status"] == "succeeded"),
        "{reports:?}"
    );
}

#[test]
fn instance_not_managed_by_ssm_is_completed_by_the_lambda_in_one_invocation() {
    let b = bench("lambda-unmanaged", "lambda-unmanaged", &[]);
    scale_in(moto(), &b.group);

    let action = finished_action(moto(), &b.instance);
    assert_eq!(action["result"], "ABANDON", "{action:#}");
    assert_eq!(action["ended_by"], "completed");
    let done = b.outcome("completed");
    assert!(
        done["why"].as_str().unwrap().contains("not managed by SSM"),
        "{done}"
    );
    let lifecycle_invocations: Vec<Value> = b
        .lambda
        .invocations()
        .into_iter()
        .filter(|i| i["event"]["detail-type"] == "EC2 Instance-terminate Lifecycle Action")
        .collect();
    assert_eq!(lifecycle_invocations.len(), 1, "{lifecycle_invocations:#?}");
    let reports = eventually("the SNS report", Duration::from_secs(30), || {
        let r = notifications(moto(), &b.topic);
        (!r.is_empty()).then_some(r)
    });
    let (subject, message, attributes) = &reports[0];
    assert!(subject.contains("backup did not run"), "{subject}");
    assert_eq!(message["status"], "not-run");
    assert_eq!(message["lifecycle_result"], "ABANDON");
    assert!(
        message["error"]
            .as_str()
            .unwrap()
            .contains("InvalidInstanceId"),
        "{message}"
    );
    assert!(attributes.to_string().contains("not-run"), "{attributes}");
}

#[test]
fn failed_command_completes_exactly_once() {
    // lifeboat is not installed: the script fails, nobody completed the action, the Lambda does.
    let b = bench("lambda-missing", "lambda-missing", &[]);
    b.register("/usr/bin:/bin", json!({}));
    scale_in(moto(), &b.group);
    let action = finished_action(moto(), &b.instance);
    assert_eq!(action["result"], "ABANDON", "{action:#}");
    assert_eq!(b.completions(&action).len(), 1, "{action:#}");
    let command = b.commands().pop().unwrap();
    assert_eq!(command["status"], "Failed");
    assert_eq!(command["exit_code"], 127);
    assert!(
        command["stderr"]
            .as_str()
            .unwrap()
            .contains("lifeboat is not installed"),
        "{command}"
    );
    let done = b.outcome("completed");
    assert!(done["why"].as_str().unwrap().contains("Failed"), "{done}");

    // lifeboat runs but the backup fails (no such bucket): the agent completes with its
    // on_failure and exits 1; the Failed status then finds no active action, which is success.
    let c = bench("lambda-fails", "lambda-fails", &[]);
    std::fs::write(
        &c.lb.config,
        daemon_config(
            "no-such-bucket-lifeboat",
            &c.dir.join("data"),
            &c.topic,
            "on_failure = \"ABANDON\"",
        ),
    )
    .unwrap();
    c.register(&Bench::path_with_lifeboat(), json!({}));
    scale_in(moto(), &c.group);
    let action = finished_action(moto(), &c.instance);
    assert_eq!(action["result"], "ABANDON", "{action:#}");
    let already = c.outcome("already-completed");
    assert!(
        already["why"].as_str().unwrap().contains("Failed"),
        "{already}"
    );
    let action = finished_action(moto(), &c.instance);
    assert_eq!(c.completions(&action).len(), 1, "{action:#}");
    assert!(c.lambda.invocations().iter().all(|i| i["ok"] == true));
}

#[test]
fn injection_attempts_are_refused_or_inert_and_nothing_executes() {
    let marker = |dir: &Path| dir.join("pwned");
    // A real group whose name a shell would misread: the Lambda refuses to send it, completes the
    // action (by token, an API call, no shell) and reports why.
    let b = bench("lambda-inject", "lambda-inject$(touch pwned)'", &[]);
    b.register(&Bench::path_with_lifeboat(), json!({}));
    let m = marker(&b.dir);
    let bad = m.display().to_string();
    scale_in(moto(), &b.group);
    let action = finished_action(moto(), &b.instance);
    assert_eq!(action["result"], "ABANDON", "{action:#}");
    let done = b.outcome("completed");
    assert!(
        done["why"]
            .as_str()
            .unwrap()
            .contains("AutoScalingGroupName"),
        "{done}"
    );

    // Tokens and hook names with quotes, $(…), backticks, newlines: refused before SendCommand.
    for (field, value) in [
        ("LifecycleActionToken", format!("'; touch {bad} #")),
        ("LifecycleHookName", format!("$(touch {bad})")),
        ("LifecycleHookName", format!("`touch {bad}`")),
        ("LifecycleActionToken", format!("x\ntouch {bad}\n")),
    ] {
        let out = b.lambda.invoke(&b.event("", json!({ field: value })));
        assert_ne!(out["result"]["outcome"], "sent", "{out:#}");
    }

    // Straight to Run Command, past the Lambda: SSM's allowedPattern refuses them.
    for (name, value) in [
        ("LifecycleActionToken", format!("'; touch {bad} #")),
        ("AutoScalingGroupName", format!("web$(touch {bad})")),
        ("Reason", format!("x`touch {bad}`")),
        ("LifecycleHookName", format!("h\ntouch {bad}")),
    ] {
        let err = b
            .send_command(&[
                ("AutoScalingGroupName", "web"),
                ("LifecycleHookName", "lifeboat"),
                (name, &value),
            ])
            .unwrap_err();
        assert!(err.contains("InvalidParameters"), "{err}");
    }

    // What the patterns admit reaches lifeboat as inert text, with a current agent and with one
    // older than 3.3.2746.0 (no SSM_* variables: the script's interpolated fallback).
    let stub = b.dir.join("stub");
    write(
        &stub.join("lifeboat"),
        b"#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$HOME/argv-$SSM_MODE\"\n",
    );
    std::fs::set_permissions(
        stub.join("lifeboat"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for legacy in [false, true] {
        let mode = if legacy { "legacy" } else { "current" };
        b.register(
            &format!("{}:/usr/bin:/bin", stub.display()),
            json!({ "legacy": legacy, "env": {
                "HOME": b.dir, "SSM_MODE": mode,
            }}),
        );
        let id = b
            .send_command(&[
                ("AutoScalingGroupName", "web tier, blue:green/x@y+z=w"),
                ("LifecycleHookName", "lifeboat"),
                ("Reason", "two  words"),
            ])
            .unwrap();
        let cmd = eventually("the stub to run", Duration::from_secs(30), || {
            b.commands()
                .into_iter()
                .find(|c| c["command_id"] == id && c["status"] == "Success")
        });
        let argv = std::fs::read_to_string(b.dir.join(format!("argv-{mode}"))).unwrap();
        assert_eq!(
            argv.lines().collect::<Vec<_>>(),
            [
                "backup",
                "--reason",
                "two  words",
                "--complete-lifecycle",
                "--hook",
                "lifeboat",
                "--asg",
                "web tier, blue:green/x@y+z=w",
                "--instance-id",
                &b.instance,
            ],
            "{mode}: {cmd}"
        );
        // A current agent passed every value as SSM_<Name>: the document declares
        // interpolationType where SSM reads it, on each parameter.
        let want: Vec<&str> = if legacy {
            vec![]
        } else {
            vec![
                "SSM_ActionBeganAfter",
                "SSM_AutoScalingGroupName",
                "SSM_HeartbeatTimeout",
                "SSM_InstanceId",
                "SSM_LifecycleActionToken",
                "SSM_LifecycleHookName",
                "SSM_Reason",
            ]
        };
        assert_eq!(cmd["agent_env"], json!(want), "{mode}: {cmd}");
    }
    assert!(!m.exists(), "an injected command ran");
    assert!(!b.dir.join("data/pwned").exists() && !Path::new("/pwned").exists());
}

#[test]
fn duplicate_events_for_one_token_make_one_backup() {
    let b = bench("lambda-dup", "lambda-dup", &[]);
    b.register(&Bench::path_with_lifeboat(), json!({}));
    // No scale-in events from moto for this one: the test delivers them itself, twice.
    control(moto(), "/events", &json!({ "group": b.group, "url": "" }));
    scale_in(moto(), &b.group);
    let token = eventually("the action", Duration::from_secs(30), || {
        moto()
            .actions()
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["instance_id"] == b.instance)
            .map(|a| a["token"].as_str().unwrap().to_owned())
    });
    let event = b.event(&token, json!({}));
    let first = b.lambda.invoke(&event);
    let second = b.lambda.invoke(&event);
    assert_eq!(first["result"]["outcome"], "sent", "{first:#}");
    assert_eq!(second["result"]["outcome"], "duplicate", "{second:#}");
    assert_eq!(
        second["result"]["command_id"],
        first["result"]["command_id"]
    );
    let action = finished_action(moto(), &b.instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    assert_eq!(b.commands().len(), 1);
    let archives: Vec<String> = moto()
        .keys(&b.bucket)
        .into_iter()
        .filter(|k| k.ends_with(".tar"))
        .collect();
    assert_eq!(archives.len(), 1, "{archives:?}");

    // Past the Lambda's check (a race, or Run Command retrying): the agent knows the token.
    let again = b.lb.run(&[
        "backup",
        "--complete-lifecycle",
        "--hook",
        "lifeboat",
        "--asg",
        &b.group,
        "--token",
        &token,
        "--instance-id",
        &b.instance,
    ]);
    assert_eq!(again.code, Some(0), "{again:#?}");
    assert_eq!(
        moto()
            .keys(&b.bucket)
            .iter()
            .filter(|k| k.ends_with(".tar"))
            .count(),
        1
    );
}

/// SSM throttles ListCommands and SendCommand past the invocation's budget in a mass scale-in:
/// the invocation fails, for Lambda to retry it, and the lifecycle action is not completed (the
/// hook holds the instance); the dedupe lookup got one attempt, SendCommand the rest of the
/// budget. Lambda's retry, once SSM answers, sends the command; the agent backs up and completes
/// CONTINUE. (The Lambda used to spend the budget on the dedupe, give SendCommand one attempt,
/// and complete the action with `LIFEBOAT_ON_FAILURE`: the instance went with no backup.)
#[test]
fn throttled_ssm_fails_the_invocation_for_retry_and_never_completes_the_action() {
    let b = bench_timed(
        "lambda-throttled",
        "lambda-throttled",
        &[("LIFEBOAT_HEARTBEAT_TIMEOUT", "900")],
        8,
    );
    b.register(&Bench::path_with_lifeboat(), json!({}));
    b.throttle_ssm(1000);
    scale_in(moto(), &b.group);
    let failed = b.invocation_left_for_retry();
    let throttled = serde_json::from_str::<Vec<Value>>(
        &http(
            "GET",
            &format!("{}/ssm/throttled", moto().control.as_ref().unwrap()),
            "",
        )
        .1,
    )
    .unwrap();
    let count = |kind: &str| {
        throttled
            .iter()
            .filter(|t| t["instance_id"] == b.instance && t["operation"] == kind)
            .count()
    };
    assert_eq!(
        count("throttle_list"),
        1,
        "one dedupe attempt: {throttled:#?}"
    );
    assert!(
        count("throttle_send") >= 3,
        "SendCommand retried: {throttled:#?}"
    );
    let actions = moto().actions();
    let action = actions
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["instance_id"] == b.instance)
        .unwrap();
    assert!(action["result"].is_null(), "still waiting: {action:#}");
    assert!(b.completions(action).is_empty(), "{action:#}");

    b.retry_backs_up(&failed);
}

/// A hook too short to outlast Lambda's retries (60 s; they take about three minutes) and SSM
/// throttled past the budget: the Lambda renews the action with one heartbeat and leaves it for
/// the retry, which sends the command; the agent backs up and completes CONTINUE. (The Lambda
/// used to complete such an action with `LIFEBOAT_ON_FAILURE` at once: no backup.)
#[test]
fn an_action_about_to_expire_is_renewed_and_left_for_retry_when_ssm_is_throttled() {
    let b = bench_timed(
        "lambda-expiring",
        "lambda-expiring",
        &[("LIFEBOAT_HEARTBEAT_TIMEOUT", "60")],
        8,
    );
    b.register(&Bench::path_with_lifeboat(), json!({}));
    b.throttle_ssm(1000);
    scale_in(moto(), &b.group);
    let failed = b.invocation_left_for_retry();
    let action = moto()
        .actions()
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["instance_id"] == b.instance)
        .cloned()
        .unwrap();
    assert!(action["result"].is_null(), "still waiting: {action:#}");
    assert!(b.completions(&action).is_empty(), "{action:#}");
    let renewed = action["calls"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["operation"] == "RecordLifecycleActionHeartbeat" && c["outcome"].is_null());
    assert!(renewed, "no heartbeat renewed the action: {action:#}");

    b.retry_backs_up(&failed);
}

/// An event handled late (40 s after it was sent, for a 60 s hook: it waited in Lambda's queue)
/// renews the action before the command goes out, so the agent has a whole timeout to start in.
#[test]
fn a_late_event_renews_the_action_before_the_command_is_sent() {
    let b = bench(
        "lambda-late",
        "lambda-late",
        &[("LIFEBOAT_HEARTBEAT_TIMEOUT", "60")],
    );
    b.register(&Bench::path_with_lifeboat(), json!({}));
    // EventBridge delivers this group's events nowhere: the test sends a late one itself.
    control(
        moto(),
        "/events",
        &json!({ "group": b.group, "url": "http://127.0.0.1:9/" }),
    );
    scale_in(moto(), &b.group);
    let token = eventually("the action", Duration::from_secs(30), || {
        moto()
            .actions()
            .as_array()?
            .iter()
            .find(|a| a["instance_id"] == b.instance)
            .and_then(|a| a["token"].as_str().map(str::to_owned))
    });
    let sent = time::OffsetDateTime::now_utc() - time::Duration::seconds(40);
    let mut event = b.event(&token, json!({}));
    event["time"] = json!(
        sent.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    let (status, _) = http("POST", &b.lambda.events_url(), &event.to_string());
    assert_eq!(status, 202);
    b.outcome("sent");
    let action = finished_action(moto(), &b.instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    let first = &action["calls"][0];
    assert_eq!(
        first["operation"], "RecordLifecycleActionHeartbeat",
        "{action:#}"
    );
    assert_eq!(first["token"], token.as_str(), "{action:#}");
    let requested = b.commands()[0]["requested"].as_f64().unwrap();
    assert!(
        first["time"].as_f64().unwrap() <= requested,
        "renewed after the command was sent: {action:#}"
    );
}

/// The template's path in a mass scale-in: EventBridge puts the lifecycle events on a queue and
/// the Lambda gets them in batches. Four instances terminate at once; three are SSM-managed
/// (each with its own instance metadata), one of them without lifeboat installed, and one is
/// not managed. The batch becomes one SendCommand for all four; SSM refuses it naming the
/// unmanaged one, which the Lambda completes itself; the other three get one command between
/// them, each runs it as itself (no instance id or token in the parameters): two back up and
/// complete CONTINUE by instance id, and the one that fails is completed by the Lambda from its
/// invocation's status event. No message is left for retry.
#[test]
fn a_batch_from_the_queue_is_one_command_and_an_unmanaged_instance_is_completed_alone() {
    let server = moto();
    let (group, instances, topic) = group_of(server, "lambda-batch", 4, 60);
    let bucket = server.bucket("lambda-batch");
    let document = crate::support::bucket_name("doc-lambda-batch");
    create_document(server, &document);
    let lambda = LambdaRuntime::start_with_args(
        server,
        &[
            ("LIFEBOAT_DOCUMENT", document.as_str()),
            ("LIFEBOAT_SNS_TOPIC_ARN", topic.as_str()),
            ("LIFEBOAT_ON_FAILURE", "ABANDON"),
        ],
        30,
        &["--batch-window", "3", "--visibility-timeout", "5"],
    );
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut imds = Vec::new();
    for (k, (dir, instance)) in dirs.iter().zip(&instances).enumerate() {
        let data = dir.path().join("data");
        write(&data.join("app.log"), instance.as_bytes());
        let lb = Lifeboat::new(
            dir.path(),
            &server.endpoint,
            &daemon_config(&bucket, &data, &topic, "on_failure = \"ABANDON\""),
        );
        let metadata = Imds::start(instance, &group);
        // The third has no lifeboat installed: its invocation fails.
        let path = if k < 2 {
            Bench::path_with_lifeboat()
        } else {
            "/usr/bin:/bin".to_owned()
        };
        register_agent(
            &lb,
            &metadata,
            instance,
            &path,
            &lambda,
            json!({ "event_statuses": ["Failed", "TimedOut", "Cancelled", "Undeliverable"] }),
        );
        imds.push(metadata);
    }
    control(
        server,
        "/events",
        &json!({ "group": group, "url": lambda.queue_url() }),
    );
    scale_in(server, &group);

    let actions: Vec<Value> = instances
        .iter()
        .map(|i| finished_action(server, i))
        .collect();
    for action in &actions[..2] {
        assert_eq!(action["result"], "CONTINUE", "{action:#}");
        assert_eq!(action["ended_by"], "completed", "{action:#}");
    }
    for action in &actions[2..] {
        assert_eq!(action["result"], "ABANDON", "{action:#}");
        assert_eq!(action["ended_by"], "completed", "{action:#}");
    }

    // The agents record a command's end after its script exits, which is after the script
    // completed the action: wait for the three to end.
    let commands = eventually("the three commands to end", Duration::from_secs(60), || {
        let commands: Vec<Value> = ssm_commands(server)
            .into_iter()
            .filter(|c| instances.contains(&c["instance_id"].as_str().unwrap().to_owned()))
            .collect();
        let ended = commands
            .iter()
            .all(|c| !matches!(c["status"].as_str(), Some("Pending" | "InProgress")));
        (commands.len() == 3 && ended).then_some(commands)
    });
    let mut commands = commands;
    commands.sort_by_key(|c| {
        instances
            .iter()
            .position(|i| c["instance_id"] == i.as_str())
    });
    for (c, instance) in commands.iter().zip(&instances) {
        assert_eq!(c["instance_id"], instance.as_str(), "{c:#}");
        // The hook's heartbeat timeout, read once by the Lambda, goes with the command.
        assert_eq!(c["parameters"]["HeartbeatTimeout"], json!(["60"]), "{c:#}");
        // When the actions began (the earliest event, less a margin): the agents' first
        // heartbeat can wait.
        let began = c["parameters"]["ActionBeganAfter"][0].as_str().unwrap();
        assert!(began.len() == 20 && began.ends_with('Z'), "{c:#}");
        assert_eq!(c["command_id"], commands[0]["command_id"], "{c:#}");
        assert_eq!(c["parameters"]["InstanceId"], json!([""]), "{c:#}");
        assert_eq!(
            c["parameters"]["LifecycleActionToken"],
            json!([""]),
            "{c:#}"
        );
    }
    let statuses: Vec<&Value> = commands.iter().map(|c| &c["status"]).collect();
    assert_eq!(statuses, ["Success", "Success", "Failed"]);
    let keys = server.keys(&bucket);
    for instance in &instances[..2] {
        let prefix = instance_prefix(&group, instance);
        assert!(
            keys.iter()
                .any(|k| k.starts_with(&prefix) && k.ends_with("-scale-in.tar")),
            "{instance}: {keys:?}"
        );
    }
    let batches: Vec<Value> = lambda
        .invocations()
        .into_iter()
        .filter(|i| i["source"] == "sqs")
        .collect();
    assert_eq!(batches.len(), 1, "{batches:#?}");
    assert_eq!(batches[0]["event"]["Records"].as_array().unwrap().len(), 4);
    assert_eq!(
        batches[0]["result"],
        json!({ "batchItemFailures": [] }),
        "{batches:#?}"
    );
    let queue = lambda.queue();
    assert_eq!(queue["deleted"], 4, "{queue}");
    assert_eq!(queue["dead"], json!([]), "{queue}");
    // The failed invocation's event: completed from the command's parameters and the event's
    // instance.
    let failed = eventually(
        "the failed invocation handled",
        Duration::from_secs(60),
        || {
            lambda.invocations().into_iter().find(|i| {
                i["event"]["detail-type"] == "EC2 Command Invocation Status-change Notification"
                    && i["result"]["outcome"] == "completed"
            })
        },
    );
    assert_eq!(
        failed["result"]["instance_id"],
        instances[2].as_str(),
        "{failed:#}"
    );
    let reports = eventually("both reports", Duration::from_secs(30), || {
        let r: Vec<String> = notifications(server, &topic)
            .into_iter()
            .filter(|(_, m, _)| m["status"] == "not-run")
            .map(|(_, m, _)| m["instance_id"].as_str().unwrap().to_owned())
            .collect();
        (r.len() == 2).then_some(r)
    });
    assert!(
        reports.contains(&instances[2]) && reports.contains(&instances[3]),
        "{reports:?}"
    );
}

/// A SendCommand whose answer comes after the attempt timed out (SSM slow under a mass
/// scale-in) had created the command: the Lambda finds it by the mark in its comment instead of
/// sending it again, and the instance backs up once.
#[test]
fn a_send_that_timed_out_after_sending_is_found_not_sent_twice() {
    let b = bench("lambda-slow-send", "lambda-slow-send", &[]);
    b.register(&Bench::path_with_lifeboat(), json!({}));
    control(
        moto(),
        "/ssm/faults",
        &json!({ "instance_id": b.instance, "slow_send": 14 }),
    );
    scale_in(moto(), &b.group);

    let sent = b.outcome("sent");
    let action = finished_action(moto(), &b.instance);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    let commands = b.commands();
    assert_eq!(commands.len(), 1, "{commands:#?}");
    assert_eq!(sent["command_id"], commands[0]["command_id"]);
    let archives: Vec<String> = moto()
        .keys(&b.bucket)
        .into_iter()
        .filter(|k| k.ends_with("-scale-in.tar"))
        .collect();
    assert_eq!(archives.len(), 1, "{archives:?}");
}

/// Registers `instance` with the SSM agent stand-in: it runs commands as that instance (its own
/// instance metadata, config and state) with `path` as PATH.
/// `extra` adds to the registration (`event_statuses`).
fn register_agent(
    lb: &Lifeboat,
    imds: &Imds,
    instance: &str,
    path: &str,
    lambda: &LambdaRuntime,
    extra: Value,
) {
    let mut env: serde_json::Map<String, Value> = lb
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v)))
        .collect();
    env.insert(
        "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
        Value::String(imds.endpoint.clone()),
    );
    let mut agent = json!({
        "instance_id": instance,
        "env": env,
        "path": path,
        "cwd": lb.dir,
        "events_url": lambda.events_url(),
    });
    agent
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    control(moto(), "/ssm/agents", &agent);
}

/// The Run Command path of a launch: the group's launch hook holds a new instance in
/// Pending:Wait, and EventBridge hands the launch event to the Lambda, which runs the
/// `lifeboat-restore` document on it. At first the instance's SSM Agent has not registered
/// (as at every boot): the event is left for Lambda's retry, not completed. The retry sends the
/// document; lifeboat restores the archive the group's other instance saved and completes the
/// action CONTINUE. A second launch whose command fails (lifeboat not installed) is completed
/// by the Lambda with `LIFEBOAT_LAUNCH_ON_FAILURE` (ABANDON), and reported.
#[test]
fn a_launch_event_runs_the_restore_document_and_the_instance_goes_in_service_with_its_data() {
    let server = moto();
    let (group, instances, topic) = group_of(server, "lambda-launch", 1, 300);
    crate::support::add_launch_hook(server, &group, 300, "CONTINUE");
    let bucket = server.bucket("lambda-launch");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let target = dir.path().join("target");
    write(&data.join("app.db"), b"carried over by Run Command");
    let config = format!(
        "{}[restore]\non_launch = true\nto = {:?}\n[sns]\ntopic_arn = \"{topic}\"\n",
        crate::support::config_for(&bucket, &[&data], "", ""),
        target.display().to_string()
    );
    let instance = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        Lifeboat::new(&d, &server.endpoint, &config)
    };
    // The group's instance saves its data.
    let a_imds = Imds::start(&instances[0], &group);
    let a = instance("a");
    let mut cmd = a.command(&["backup"]);
    cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &a_imds.endpoint);
    let key =
        crate::support::wait_output(cmd.spawn().unwrap(), Duration::from_secs(120), &["backup"])
            .stored_key();

    let document = crate::support::bucket_name("doc-lambda-launch");
    let content =
        std::fs::read_to_string(root().join("ssm-documents/lifeboat-restore.json")).unwrap();
    rt().block_on(
        server
            .ssm()
            .create_document()
            .name(&document)
            .content(content)
            .document_type(aws_sdk_ssm::types::DocumentType::Command)
            .document_format(aws_sdk_ssm::types::DocumentFormat::Json)
            .send(),
    )
    .unwrap();
    let lambda = LambdaRuntime::start_with_timeout(
        server,
        &[
            ("LIFEBOAT_RESTORE_DOCUMENT", document.as_str()),
            ("LIFEBOAT_SNS_TOPIC_ARN", topic.as_str()),
        ],
        30,
    );
    control(
        server,
        "/events",
        &json!({ "group": group, "url": lambda.events_url() }),
    );
    let scale_out = |to: i32| {
        let before = crate::support::instances_in(server, &group, None);
        crate::support::set_capacity(server, &group, to);
        let new: Vec<String> = crate::support::instances_in(server, &group, Some("Pending:Wait"))
            .into_iter()
            .filter(|i| !before.contains(i))
            .collect();
        assert_eq!(new.len(), 1, "{new:?}");
        new[0].clone()
    };

    // Scale out: the launch event reaches the Lambda before the instance's agent registers.
    let b = scale_out(2);
    let failed = eventually(
        "the launch event to be left for retry",
        Duration::from_secs(60),
        || lambda.invocations().into_iter().find(|i| i["ok"] == false),
    );
    assert!(
        failed["error"]
            .to_string()
            .contains("left for Lambda's retry")
            && failed["error"].to_string().contains(&b),
        "{failed:#}"
    );
    let b_imds = Imds::start(&b, &group);
    let lb_b = instance("b");
    register_agent(
        &lb_b,
        &b_imds,
        &b,
        &Bench::path_with_lifeboat(),
        &lambda,
        json!({}),
    );
    // Lambda's retry of the event.
    let (status, _) = http("POST", &lambda.events_url(), &failed["event"].to_string());
    assert_eq!(status, 202);
    let action = finished_action(server, &b);
    assert_eq!(action["result"], "CONTINUE", "{action:#}");
    assert_eq!(action["ended_by"], "completed", "{action:#}");
    assert_eq!(
        std::fs::read(target.join(data.strip_prefix("/").unwrap()).join("app.db")).unwrap(),
        b"carried over by Run Command"
    );
    let sent = eventually(
        "the command the retry sent",
        Duration::from_secs(30),
        || {
            ssm_commands(server)
                .into_iter()
                .find(|c| c["instance_id"] == b.as_str())
        },
    );
    assert_eq!(sent["document_name"], document.as_str(), "{sent:#}");
    assert_eq!(sent["parameters"]["Reason"], json!(["launch"]), "{sent:#}");
    assert_eq!(
        sent["parameters"]["LifecycleHookName"],
        json!(["lifeboat-launch"]),
        "{sent:#}"
    );
    let reports = notifications(server, &topic);
    let restored = reports
        .iter()
        .find(|(_, m, _)| m["instance_id"] == b.as_str())
        .map(|(_, m, _)| m.clone())
        .expect("a report for the launched instance");
    assert_eq!(restored["status"], "restored", "{restored:#}");
    assert_eq!(restored["object_url"], format!("s3://{bucket}/{key}"));

    // A launch whose command fails: the Lambda completes the action ABANDON and reports it.
    let c = scale_out(3);
    let c_imds = Imds::start(&c, &group);
    let lb_c = instance("c");
    register_agent(&lb_c, &c_imds, &c, "/usr/bin:/bin", &lambda, json!({}));
    let retry = eventually("the second launch event", Duration::from_secs(60), || {
        lambda
            .invocations()
            .into_iter()
            .find(|i| i["ok"] == false && i["error"].to_string().contains(&c))
            .map(|i| i["event"].clone())
            .or_else(|| {
                // The agent registered before the event was handled: sent at once.
                ssm_commands(server)
                    .iter()
                    .any(|x| x["instance_id"] == c.as_str())
                    .then_some(Value::Null)
            })
    });
    if !retry.is_null() {
        let (status, _) = http("POST", &lambda.events_url(), &retry.to_string());
        assert_eq!(status, 202);
    }
    let action = finished_action(server, &c);
    assert_eq!(action["result"], "ABANDON", "{action:#}");
    assert_eq!(action["ended_by"], "completed", "{action:#}");
    let report = eventually(
        "the failed launch's report",
        Duration::from_secs(30),
        || {
            notifications(server, &topic)
                .into_iter()
                .find(|(_, m, _)| m["instance_id"] == c.as_str())
        },
    );
    assert_eq!(report.1["status"], "restore-failed", "{:#}", report.1);
    assert_eq!(report.1["lifecycle_result"], "ABANDON", "{:#}", report.1);
}
