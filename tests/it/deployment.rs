//! The deployment files: the CloudFormation template passes cfn-lint, embeds the shipped
//! document, and scopes every IAM statement to named resources ("*" only where IAM cannot scope
//! the action, each such statement commented); the shipped IAM policies likewise; and the
//! packaged default configuration lists every key with the default the code applies; the
//! Lambda's policies allow every call its code makes.

use std::process::Command;

use serde_json::{Value, json};

use crate::support::{Lifeboat, root};

/// The template as JSON (parsed by PyYAML in the test venv; it uses no short-form tags).
fn template() -> Value {
    let out = Command::new(root().join(".venv/bin/python"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(root().join("packaging/cloudformation/lifeboat.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cfn_lint_passes_on_the_template() {
    let out = Command::new(root().join(".venv/bin/cfn-lint"))
        .arg(root().join("packaging/cloudformation/lifeboat.yaml"))
        .output()
        .expect("cfn-lint (scripts/bootstrap.sh installs it)");
    assert!(
        out.status.success(),
        "cfn-lint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_template_embeds_the_shipped_documents() {
    let t = template();
    for (resource, file) in [
        ("BackupDocument", "lifeboat-backup.json"),
        ("SnapshotDocument", "lifeboat-snapshot.json"),
        ("RestoreDocument", "lifeboat-restore.json"),
    ] {
        let shipped: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("ssm-documents").join(file)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            t["Resources"][resource]["Properties"]["Content"], shipped,
            "{file}"
        );
    }
}

/// `SnapshotSchedule` (optional): State Manager runs the snapshot document on the group's
/// instances, by the group's tag, with reason `scheduled`, a tenth at a time.
#[test]
fn the_templates_snapshot_association_targets_the_group() {
    let t = template();
    assert_eq!(t["Parameters"]["SnapshotSchedule"]["Default"], "");
    let a = &t["Resources"]["SnapshotAssociation"];
    assert_eq!(a["Condition"], "HasSnapshotSchedule");
    assert_eq!(
        t["Resources"]["SnapshotDocument"]["Condition"],
        "HasSnapshotSchedule"
    );
    let p = &a["Properties"];
    assert_eq!(p["Name"]["Ref"], "SnapshotDocument");
    assert_eq!(p["ScheduleExpression"]["Ref"], "SnapshotSchedule");
    assert_eq!(p["Targets"][0]["Key"], "tag:aws:autoscaling:groupName");
    assert_eq!(p["Targets"][0]["Values"][0]["Ref"], "AutoScalingGroupName");
    assert_eq!(p["Parameters"]["Reason"][0], "scheduled");
    assert_eq!(p["MaxConcurrency"], "10%");
}

/// Every Allow statement of every policy document in `docs`: (policy, Sid, statement).
fn allow_statements(docs: Vec<(String, Value)>) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (name, doc) in docs {
        for st in doc["Statement"].as_array().unwrap() {
            if st["Effect"] == "Allow" && st.get("Principal").is_none() {
                let sid = st["Sid"].as_str().unwrap_or_default().to_owned();
                out.push((name.clone(), sid, st.clone()));
            }
        }
    }
    out
}

fn is_star(resource: &Value) -> bool {
    resource == "*"
        || resource
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r == "*"))
}

#[test]
fn every_iam_statement_in_the_template_names_its_resources() {
    let t = template();
    let text =
        std::fs::read_to_string(root().join("packaging/cloudformation/lifeboat.yaml")).unwrap();
    let mut docs = Vec::new();
    for (name, r) in t["Resources"].as_object().unwrap() {
        let p = &r["Properties"];
        match r["Type"].as_str().unwrap() {
            "AWS::IAM::ManagedPolicy" => docs.push((name.clone(), p["PolicyDocument"].clone())),
            "AWS::IAM::Role" => {
                for policy in p["Policies"].as_array().into_iter().flatten() {
                    docs.push((name.clone(), policy["PolicyDocument"].clone()));
                }
            }
            _ => {}
        }
    }
    let statements = allow_statements(docs);
    assert!(statements.len() >= 10, "{statements:?}");
    for (policy, sid, st) in statements {
        let resource = st
            .get("Resource")
            .unwrap_or_else(|| panic!("{policy}/{sid}: no Resource"));
        if is_star(resource) {
            // The statement must say why, in a comment right above it.
            let line = text
                .lines()
                .position(|l| l.trim() == format!("- Sid: {sid}"))
                .unwrap();
            let above = text.lines().nth(line - 1).unwrap().trim();
            assert!(
                above.starts_with('#') && above.contains("cannot be scoped"),
                "{policy}/{sid}: Resource \"*\" without a comment saying why"
            );
            let actions = st["Action"].to_string();
            assert!(
                actions.contains("Describe") || actions.contains("ListCommands"),
                "{policy}/{sid}: only describe/list calls may use \"*\": {actions}"
            );
        }
    }
}

#[test]
fn the_shipped_iam_policies_name_their_resources() {
    for file in ["instance-policy.json", "lambda-policy.json"] {
        let doc: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("packaging/iam").join(file)).unwrap(),
        )
        .unwrap();
        for (_, sid, st) in allow_statements(vec![(file.into(), doc)]) {
            if is_star(&st["Resource"]) {
                assert!(sid.ends_with("CannotBeScopedToAResource"), "{file}/{sid}");
            }
        }
    }
}

/// The statements of a policy document, with the branches of `Fn::If` statements flattened.
fn statements_of(doc: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for st in doc["Statement"].as_array().unwrap() {
        match st.get("Fn::If") {
            Some(branches) => out.extend(
                branches.as_array().unwrap()[1..]
                    .iter()
                    .filter(|b| b.get("Effect").is_some())
                    .cloned(),
            ),
            None => out.push(st.clone()),
        }
    }
    out
}

/// Whether an IAM action (possibly a wildcard) reaches objects: reading, writing, tagging,
/// aborting uploads or listing their parts.
fn reaches_objects(action: &str) -> bool {
    action == "*"
        || action.strip_prefix("s3:").is_some_and(|a| {
            a.contains('*') || a.contains("Object") || a.contains("MultipartUpload")
        })
}

/// Resource strings of a statement: Fn::Sub templates as written, anything else as JSON.
fn resources(st: &Value) -> Vec<String> {
    let one = |r: &Value| match r {
        Value::String(s) => s.clone(),
        other => match other.get("Fn::Sub") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) => a[0].as_str().unwrap().to_owned(),
            _ => other.to_string(),
        },
    };
    match &st["Resource"] {
        Value::Array(a) => a.iter().map(one).collect(),
        r => vec![one(r)],
    }
}

/// Fails on any statement of `doc` that grants object access beyond the caller's own instance
/// ARN (`.../${ec2:SourceInstanceARN}/*`; `${!…}` is the same inside Fn::Sub).
fn assert_own_objects_only(name: &str, doc: &Value) {
    let mut object_grants = 0;
    for st in statements_of(doc) {
        if st["Effect"] != "Allow" {
            continue;
        }
        let actions: Vec<String> = match &st["Action"] {
            Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_owned()).collect(),
            a => vec![a.as_str().unwrap().to_owned()],
        };
        let sid = st["Sid"].as_str().unwrap_or("(no Sid)");
        assert!(
            st.get("NotAction").is_none() && st.get("NotResource").is_none(),
            "{name}/{sid}"
        );
        if !actions.iter().any(|a| reaches_objects(a)) {
            continue;
        }
        object_grants += 1;
        for r in resources(&st) {
            let own = [
                "/${ec2:SourceInstanceARN}/*",
                "/${!ec2:SourceInstanceARN}/*",
            ];
            assert!(
                own.iter()
                    .any(|o| r.ends_with(o) || r.ends_with(&format!("{o}.staging/*"))),
                "{name}/{sid}: {actions:?} on {r} reaches other instances' archives"
            );
            // Deleting reaches staged parts only (src/upload/staged.rs), never an archive;
            // except the opt-in retention grant (PruneOnInstances), which may place delete
            // markers on its own archives but never delete a version.
            if sid == "PruneOwnArchivesOnly" {
                assert_eq!(actions, ["s3:DeleteObject"], "{name}/{sid}");
                continue;
            }
            if actions
                .iter()
                .any(|a| a == "*" || a.contains("Delete") || a == "s3:*")
            {
                assert!(
                    r.ends_with("*.staging/*"),
                    "{name}/{sid}: {actions:?} on {r} can delete archives"
                );
            }
        }
    }
    assert!(
        object_grants >= 2,
        "{name}: writes and reads its own archives"
    );
}

#[test]
fn no_instance_policy_grants_object_access_across_instances() {
    let shipped: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("packaging/iam/instance-policy.json")).unwrap(),
    )
    .unwrap();
    assert_own_objects_only("instance-policy.json", &shipped);

    let t = template();
    let resources = t["Resources"].as_object().unwrap();
    let mut on_instance_role = 0;
    for (name, r) in resources {
        let roles = r["Properties"]["Roles"].to_string();
        if r["Type"] == "AWS::IAM::ManagedPolicy"
            && roles.contains("InstanceRoleName")
            && name != "GroupRestorePolicy"
        {
            assert_own_objects_only(name, &r["Properties"]["PolicyDocument"]);
            on_instance_role += 1;
        }
    }
    assert_eq!(on_instance_role, 1, "one policy on the instance role");
    // Restore on launch (opt-in): the instance role reads its own group's archives, and only
    // reads them.
    let group = &resources["GroupRestorePolicy"];
    assert_eq!(group["Condition"], "HasRestoreOnLaunch");
    for st in statements_of(&group["Properties"]["PolicyDocument"]) {
        let actions = st["Action"].to_string();
        assert!(
            ["s3:GetObject", "s3:ListBucket", "kms:Decrypt"]
                .iter()
                .any(|a| actions == format!("\"{a}\"")),
            "{st}"
        );
        for r in self::resources(&st) {
            assert!(
                r.ends_with("${BucketArn}/${Prefix}${GroupSegment}/*")
                    || !actions.contains("GetObject"),
                "{st}"
            );
        }
        if actions.contains("ListBucket") {
            assert!(
                st["Condition"]
                    .to_string()
                    .contains("${Prefix}${GroupSegment}/*"),
                "{st}"
            );
        }
    }
    // The cross-instance read is its own policy, attached only to the roles named for it.
    let restore = &resources["RestorePolicy"]["Properties"];
    assert!(!restore["Roles"].to_string().contains("InstanceRoleName"));
    assert!(restore["Roles"].to_string().contains("RestoreRoleNames"));

    // The check itself: the policy this release replaced, a prefix-wide grant, fails it.
    let old = serde_json::json!({"Statement": [{
        "Sid": "WriteAndReadArchivesUnderThePrefixOnly", "Effect": "Allow",
        "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:GetObject"],
        "Resource": "arn:aws:s3:::BUCKET/PREFIX*"}]});
    let caught = std::panic::catch_unwind(|| assert_own_objects_only("old", &old));
    assert!(
        caught.is_err(),
        "a prefix-wide object grant must fail the check"
    );
}

#[test]
fn the_packaged_config_lists_every_key_with_the_codes_default() {
    let shipped = std::fs::read_to_string(root().join("packaging/lifeboat.toml")).unwrap();
    // Uncomment every `# key = value` line and fill in the one required value.
    let uncommented: String = shipped
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.contains(" = ") && !rest.contains(':') => rest.to_owned(),
            _ => l.replace("bucket = \"\"", "bucket = \"my-backups\""),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let lb = Lifeboat::new(dir.path(), "http://127.0.0.1:9", &uncommented);
    let effective = lb.run(&["config", "check"]);
    let effective = effective.ok();
    // Every effective line is in the file as written, and the file has no key the code lacks.
    for line in effective.lines().filter(|l| l.contains(" = ")) {
        assert!(
            uncommented.lines().any(|l| l.trim() == line.trim()),
            "the packaged config lacks or differs on: {line}"
        );
    }
    let keys = |s: &str| {
        s.lines()
            .filter(|l| l.contains(" = ") && !l.starts_with('#'))
            .count()
    };
    assert_eq!(keys(&uncommented), keys(effective), "{uncommented}");
}

/// The IAM actions the Lambda's code calls, read from its source: `self.client.<op>()` in
/// `lambda/src/ssm.rs` (SSM), `self.lifecycle.<method>(` (lifeboat_common's Auto Scaling
/// calls) and `report::publish(` (SNS).
fn lambda_actions() -> Vec<String> {
    let mut code = String::new();
    for entry in std::fs::read_dir(root().join("lambda/src")).unwrap() {
        code += &std::fs::read_to_string(entry.unwrap().path()).unwrap();
    }
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    let calls = |prefix: &str| -> Vec<String> {
        code.match_indices(prefix)
            .map(|(at, _)| {
                code[at + prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect()
            })
            .collect()
    };
    let pascal = |op: &str| -> String {
        op.split('_')
            .map(|w| w[..1].to_uppercase() + &w[1..])
            .collect()
    };
    let mut actions: Vec<String> = calls("self.client.")
        .iter()
        .map(|op| format!("ssm:{}", pascal(op)))
        .collect();
    for method in calls("self.lifecycle.") {
        actions.push(
            match method.as_str() {
                "heartbeat" => "autoscaling:RecordLifecycleActionHeartbeat",
                "complete" => "autoscaling:CompleteLifecycleAction",
                "describe_instance" => "autoscaling:DescribeAutoScalingInstances",
                "terminate_hook" | "hook_for" => "autoscaling:DescribeLifecycleHooks",
                other => panic!("the Lambda calls Lifecycle::{other}: add its IAM action here"),
            }
            .to_owned(),
        );
    }
    if code.contains("report::publish(") {
        actions.push("sns:Publish".into());
    }
    actions.sort();
    actions.dedup();
    actions
}

fn allowed_actions(statements: &[Value]) -> Vec<String> {
    statements
        .iter()
        .filter(|st| st["Effect"] == "Allow")
        .flat_map(|st| match &st["Action"] {
            Value::String(a) => vec![a.clone()],
            Value::Array(a) => a.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
            other => panic!("Action {other}"),
        })
        .collect()
}

#[test]
fn the_lambda_policies_allow_every_call_the_lambda_makes() {
    let needed = lambda_actions();
    for expected in [
        "ssm:SendCommand",
        "ssm:ListCommands",
        "ssm:DescribeDocument",
        "autoscaling:RecordLifecycleActionHeartbeat",
        "autoscaling:CompleteLifecycleAction",
        "sns:Publish",
    ] {
        assert!(
            needed.iter().any(|a| a == expected),
            "{expected} in {needed:?}"
        );
    }
    let t = template();
    let role = &t["Resources"]["FunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"];
    let shipped: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("packaging/iam/lambda-policy.json")).unwrap(),
    )
    .unwrap();
    for (name, doc) in [
        ("the template's FunctionRole", role),
        ("lambda-policy.json", &shipped),
    ] {
        let allowed = allowed_actions(&statements_of(doc));
        for action in &needed {
            assert!(
                allowed.contains(action),
                "{name} does not allow {action}, which the Lambda calls"
            );
        }
    }
}

/// `LaunchHook=true` adds a launch hook for restore on launch; its default result is CONTINUE, so
/// an instance whose restore unit never answers still goes in service (after the timeout)
/// instead of every launch of the group failing.
#[test]
fn the_templates_launch_hook_is_optional_and_never_blocks_launches() {
    let t = template();
    assert_eq!(t["Parameters"]["RestoreOnLaunch"]["Default"], "off");
    let hook = &t["Resources"]["LaunchLifecycleHook"];
    assert_eq!(hook["Condition"], "HasLaunchHook", "{hook}");
    let p = &hook["Properties"];
    assert_eq!(
        p["LifecycleTransition"],
        "autoscaling:EC2_INSTANCE_LAUNCHING"
    );
    assert_eq!(p["DefaultResult"], "CONTINUE");
}

/// `RestoreOnLaunch=launch-hook`: launch events of the group reach the Lambda, which may send
/// the restore document (and only it, besides the backup document) and hears of its failures.
#[test]
fn with_a_launch_hook_the_lambda_runs_the_restore_document_on_launch_events() {
    let t = template();
    let r = &t["Resources"];
    assert_eq!(r["RestoreDocument"]["Condition"], "HasLaunchHook");
    let types = &r["LifecycleRule"]["Properties"]["EventPattern"]["detail-type"]["Fn::If"];
    assert_eq!(types[0], "HasLaunchHook");
    assert_eq!(
        types[1],
        json!([
            "EC2 Instance-terminate Lifecycle Action",
            "EC2 Instance-launch Lifecycle Action"
        ])
    );
    assert_eq!(types[2], json!(["EC2 Instance-terminate Lifecycle Action"]));
    assert_eq!(
        r["Function"]["Properties"]["Environment"]["Variables"]["LIFEBOAT_RESTORE_DOCUMENT"],
        json!({ "Fn::If": ["HasLaunchHook", { "Ref": "RestoreDocument" }, ""] })
    );
    let names = &r["CommandRule"]["Properties"]["EventPattern"]["detail"]["document-name"];
    assert_eq!(
        names[1],
        json!({ "Fn::If": ["HasLaunchHook", { "Ref": "RestoreDocument" }, { "Ref": "AWS::NoValue" }] })
    );
    let statements = r["FunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
        .as_array()
        .unwrap();
    let restore = statements
        .iter()
        .find_map(|s| {
            let s = &s["Fn::If"];
            (s[0] == "HasLaunchHook").then(|| s[1].clone())
        })
        .expect("a statement for the restore document");
    assert_eq!(restore["Sid"], "SendTheRestoreDocumentOnLaunch");
    assert!(
        restore["Resource"]["Fn::Sub"]
            .as_str()
            .unwrap()
            .ends_with(":document/${RestoreDocument}"),
        "{restore}"
    );
}

/// `PruneOnInstances` (off by default) lets an instance delete its own archives for
/// `retention.after_backup`: delete markers only, in the versioned bucket.
#[test]
fn pruning_by_instances_is_opt_in_and_leaves_versions() {
    let t = template();
    assert_eq!(t["Parameters"]["PruneOnInstances"]["Default"], "false");
    let policy = &t["Resources"]["InstancePolicy"]["Properties"]["PolicyDocument"];
    let grant = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|st| {
            let b = st.get("Fn::If")?;
            (b[0] == "HasPruneOnInstances").then(|| b.clone())
        })
        .expect("an opt-in statement");
    assert_eq!(grant[1]["Sid"], "PruneOwnArchivesOnly");
    assert_eq!(grant[1]["Action"], "s3:DeleteObject");
    assert_eq!(grant[2], json!({ "Ref": "AWS::NoValue" }));
    let versioning = &t["Resources"]["ArchiveBucket"]["Properties"]["VersioningConfiguration"];
    assert_eq!(versioning["Status"], "Enabled");
}

/// The template's `ConfigParameter` holds a configuration lifeboat accepts (the stack's values
/// substituted), and the instance policy may read that parameter and no other.
#[test]
fn the_templates_config_parameter_is_a_valid_configuration_the_instances_may_read() {
    let t = template();
    let p = &t["Resources"]["ConfigParameter"]["Properties"];
    assert_eq!(p["Name"]["Fn::Sub"], "/lifeboat/${AWS::StackName}");
    let text = p["Value"]["Fn::Sub"][0]
        .as_str()
        .unwrap()
        .replace("${AutoScalingGroupName}", "web")
        .replace("${AWS::StackName}", "lifeboat-web")
        .replace("${Bucket}", "lifeboat-web-archivebucket-1a2b3c")
        .replace("${Prefix}", "lifeboat/")
        .replace(
            "${Topic}",
            "arn:aws:sns:us-east-1:123456789012:lifeboat-web-ReportTopic",
        );
    assert!(!text.contains("${"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let lb = Lifeboat::new(dir.path(), "http://127.0.0.1:9", &text);
    let out = lb.run(&["config", "check"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let statements =
        statements_of(&t["Resources"]["InstancePolicy"]["Properties"]["PolicyDocument"]);
    let read = statements
        .iter()
        .find(|s| s["Sid"] == "ReadTheConfigParameterOnly")
        .expect("the instances may read the parameter");
    assert_eq!(read["Action"], "ssm:GetParameter");
    assert!(
        read["Resource"]["Fn::Sub"]
            .as_str()
            .unwrap()
            .ends_with(":parameter/lifeboat/${AWS::StackName}"),
        "{read}"
    );
}

/// The README's configuration block (under "## Configuration") is what the code does: it names
/// every key, and each value is the default (`s3.bucket` aside, which has none).
#[test]
fn the_readme_configuration_block_is_the_codes_defaults() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("a Configuration section");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a toml block");
    let written: toml::Table = toml::from_str(block).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let effective = |text: &str| -> Value {
        let lb = Lifeboat::new(dir.path(), "http://127.0.0.1:9", text);
        let out = lb.run(&["--json", "config", "check"]);
        serde_json::from_str::<Value>(out.ok().trim()).unwrap()["config"].clone()
    };
    let defaults = effective("[s3]\nbucket = \"my-backups\"\n");
    assert_eq!(
        effective(block),
        defaults,
        "the block's values are the defaults"
    );
    // Every key of the code is in the block (a key left out would be a default nobody reads of).
    for (section, keys) in defaults.as_object().unwrap() {
        for key in keys.as_object().unwrap().keys() {
            if key == "paths" && section == "restore" {
                continue;
            }
            assert!(
                written.get(section).and_then(|s| s.get(key)).is_some(),
                "the README's block lacks {section}.{key}"
            );
        }
    }
}

/// `TransitionDays` (off by default) moves archives to a cheaper class, but only objects over
/// 128 MiB: manifests and job logs (at most `joblog::LIMIT`) stay STANDARD, where list, verify
/// and restore read them; the default class stays readable at once (a launch can take it over).
#[test]
fn the_template_transitions_archives_only_and_readably_by_default() {
    let t = template();
    assert_eq!(t["Parameters"]["TransitionDays"]["Default"], 0);
    assert_eq!(
        t["Parameters"]["TransitionStorageClass"]["Default"],
        "GLACIER_IR"
    );
    let rules = t["Resources"]["ArchiveBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
        .as_array()
        .unwrap();
    let rule = rules
        .iter()
        .find(|r| r["Id"] == "transition-archives")
        .expect("a transition rule");
    assert_eq!(rule["Status"]["Fn::If"][0], "HasTransition");
    let floor: usize = rule["ObjectSizeGreaterThan"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        floor >= lifeboat::joblog::LIMIT,
        "a job log could move out of STANDARD"
    );
    assert_eq!(
        rule["Transitions"][0]["StorageClass"]["Ref"],
        "TransitionStorageClass"
    );
}

/// `ExistingBucket` / `ExistingTopicArn`: the stack uses them instead of creating its own, and
/// no reference to its own bucket or topic is left unconditional (it would fail to deploy).
#[test]
fn the_template_can_use_an_existing_bucket_and_topic() {
    let t = template();
    let r = &t["Resources"];
    assert_eq!(r["ArchiveBucket"]["Condition"], "CreateBucket");
    assert_eq!(r["ArchiveBucketPolicy"]["Condition"], "CreateBucket");
    assert_eq!(r["ReportTopic"]["Condition"], "CreateTopic");
    assert_eq!(t["Parameters"]["ExistingBucket"]["Default"], "");
    assert_eq!(t["Parameters"]["ExistingTopicArn"]["Default"], "");
    // Every mention of the stack's own bucket or topic outside the resources that exist only
    // with them sits inside an Fn::If on the same condition.
    fn unguarded(v: &Value, name: &str, condition: &str, path: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(branches) = m.get("Fn::If")
                    && branches[0] == condition
                {
                    unguarded(&branches[2], name, condition, path, out);
                    return;
                }
                for (k, child) in m {
                    unguarded(child, name, condition, &format!("{path}/{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    unguarded(child, name, condition, &format!("{path}/{i}"), out);
                }
            }
            Value::String(s) if s == name || s.contains(&format!("${{{name}")) => {
                out.push(path.to_owned());
            }
            _ => {}
        }
    }
    for (name, condition, own) in [
        (
            "ArchiveBucket",
            "CreateBucket",
            vec!["ArchiveBucket", "ArchiveBucketPolicy"],
        ),
        (
            "ReportTopic",
            "CreateTopic",
            vec!["ReportTopic", "ReportSubscription"],
        ),
    ] {
        let mut found = Vec::new();
        for (id, res) in r.as_object().unwrap() {
            if !own.contains(&id.as_str()) {
                unguarded(res, name, condition, id, &mut found);
            }
        }
        unguarded(&t["Outputs"], name, condition, "Outputs", &mut found);
        assert!(
            found.is_empty(),
            "{name} used without {condition}: {found:?}"
        );
    }
    // The subscription exists only with the stack's own topic.
    assert_eq!(
        t["Conditions"]["HasEmail"]["Fn::And"][1],
        json!({ "Condition": "CreateTopic" })
    );
}

/// Tags are the stack's (`--tags`), which CloudFormation copies to every resource that takes
/// them: no resource sets tags of its own (a resource's own tag shadows the stack's of the same
/// key), and the deploy commands in the README and the template show how.
#[test]
fn the_template_leaves_tags_to_the_stack() {
    let t = template();
    let own: Vec<&String> = t["Resources"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, res)| res["Properties"].get("Tags").is_some())
        .map(|(id, _)| id)
        .collect();
    assert!(own.is_empty(), "resources with their own tags: {own:?}");
    for file in ["README.md", "packaging/cloudformation/lifeboat.yaml"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let deploy = text
            .split("aws cloudformation deploy")
            .nth(1)
            .unwrap_or_else(|| panic!("{file} shows no deploy command"));
        let command: String = deploy
            .split("```")
            .next()
            .unwrap()
            .chars()
            .take(600)
            .collect();
        assert!(command.contains("--tags "), "{file}: {command}");
    }
}

/// The template's value of `v` for a group `group` in bucket `b` under `lifeboat/`: the
/// intrinsic functions the policies use (`Ref`, `Fn::Sub`, `Fn::Join`, `Fn::Split`, `Fn::If`
/// with the stack's own bucket, `Fn::GetAtt` of the bucket).
fn render(v: &Value, group: &str) -> Value {
    let param = |name: &str| -> Value {
        match name {
            "Prefix" => json!("lifeboat/"),
            "AutoScalingGroupName" => json!(group),
            "AWS::Partition" => json!("aws"),
            other => json!(format!("<{other}>")),
        }
    };
    let Some(obj) = v.as_object().filter(|o| o.len() == 1) else {
        return match v {
            Value::Array(a) => Value::Array(a.iter().map(|x| render(x, group)).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| (k.clone(), render(x, group)))
                    .collect(),
            ),
            other => other.clone(),
        };
    };
    let (f, arg) = obj.iter().next().unwrap();
    let text = |x: &Value| render(x, group).as_str().unwrap().to_owned();
    match f.as_str() {
        "Ref" => param(arg.as_str().unwrap()),
        "Fn::GetAtt" => json!("arn:aws:s3:::b"),
        "Fn::If" => render(&arg[1], group),
        "Fn::Join" => {
            let parts: Vec<String> = render(&arg[1], group)
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect();
            json!(parts.join(arg[0].as_str().unwrap()))
        }
        "Fn::Split" => json!(
            text(&arg[1])
                .split(arg[0].as_str().unwrap())
                .collect::<Vec<_>>()
        ),
        "Fn::Sub" => {
            let (template, vars) = match arg {
                Value::String(s) => (s.clone(), serde_json::Map::new()),
                a => (
                    a[0].as_str().unwrap().to_owned(),
                    a[1].as_object().unwrap().clone(),
                ),
            };
            let mut out = String::new();
            let mut rest = template.as_str();
            while let Some(i) = rest.find("${") {
                out.push_str(&rest[..i]);
                let end = rest[i..].find('}').unwrap() + i;
                let name = &rest[i + 2..end];
                match name.strip_prefix('!') {
                    Some(literal) => out.push_str(&format!("${{{literal}}}")),
                    None => match vars.get(name) {
                        Some(x) => out.push_str(&text(x)),
                        None => out.push_str(param(name).as_str().unwrap()),
                    },
                }
                rest = &rest[end + 1..];
            }
            out.push_str(rest);
            json!(out)
        }
        _ => Value::Object(
            obj.iter()
                .map(|(k, x)| (k.clone(), render(x, group)))
                .collect(),
        ),
    }
}

/// IAM's match of a resource pattern (`*` any run, `?` one character) against an ARN.
fn iam_matches(pattern: &str, arn: &str) -> bool {
    let (p, a): (Vec<char>, Vec<char>) = (pattern.chars().collect(), arn.chars().collect());
    // matched[j]: the pattern so far matches the first j characters of the ARN.
    let mut matched = vec![false; a.len() + 1];
    matched[0] = true;
    for c in p {
        let mut next = vec![false; a.len() + 1];
        for j in 0..=a.len() {
            next[j] = match c {
                '*' => matched[j] || (j > 0 && next[j - 1]),
                '?' => j > 0 && matched[j - 1],
                c => j > 0 && matched[j - 1] && a[j - 1] == c,
            };
        }
        matched = next;
    }
    matched[a.len()]
}

/// Which of `keys` a policy lets the instance `me` put, for the group `group`.
fn puttable(doc: &Value, me: &str, keys: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for st in statements_of(doc) {
        if !st["Action"].to_string().contains("s3:PutObject") {
            continue;
        }
        let patterns: Vec<String> = match &st["Resource"] {
            Value::Array(a) => a.iter().map(|r| r.as_str().unwrap().to_owned()).collect(),
            r => vec![r.as_str().unwrap().to_owned()],
        };
        for key in keys {
            let arn = format!("arn:aws:s3:::b/{key}");
            if patterns
                .iter()
                .map(|p| p.replace("${ec2:SourceInstanceARN}", me))
                .any(|p| iam_matches(&p, &arn))
                && !out.contains(key)
            {
                out.push(key.clone());
            }
        }
    }
    out
}

/// A replacement takes over the newest archive filed under its group: an instance may write
/// under its own ARN in its own group's prefix (or `standalone/`, where a backup goes when
/// Auto Scaling cannot name the group and where no launch looks), never in another group's,
/// even one that shares the bucket and prefix. Group names are encoded as the keys encode them
/// (`team/web` as `team%2Fweb`).
#[test]
fn an_instance_writes_only_under_its_own_group_or_standalone() {
    let me = "arn:aws:ec2:us-east-1:123456789012:instance/i-0me";
    let other = "arn:aws:ec2:us-east-1:123456789012:instance/i-0other";
    let key = |group: &str, owner: &str| {
        format!("lifeboat/{group}/{owner}/20261127T080000Z-scale-in.tar.zst")
    };
    let keys = [
        key("team%2Fweb", me),
        key("standalone", me),
        key("db", me),
        key("team/web", me),
        key("team%2Fweb", other),
    ];
    let allowed = vec![keys[0].clone(), keys[1].clone()];

    let t = template();
    let policy = render(
        &t["Resources"]["InstancePolicy"]["Properties"]["PolicyDocument"],
        "team/web",
    );
    assert_eq!(puttable(&policy, me, &keys), allowed, "template");

    let shipped = std::fs::read_to_string(root().join("packaging/iam/instance-policy.json"))
        .unwrap()
        .replace("BUCKET", "b")
        .replace("PREFIX", "lifeboat/")
        .replace("GROUP", "team%2Fweb");
    let shipped: Value = serde_json::from_str(&shipped).unwrap();
    assert_eq!(
        puttable(&shipped, me, &keys),
        allowed,
        "instance-policy.json"
    );

    // What the group's replacements read at launch is that same group prefix.
    let group = render(
        &t["Resources"]["GroupRestorePolicy"]["Properties"]["PolicyDocument"],
        "team/web",
    );
    let reads = group["Statement"][0]["Resource"].as_str().unwrap();
    assert_eq!(reads, "arn:aws:s3:::b/lifeboat/team%2Fweb/*");
    let lists = &group["Statement"][1]["Condition"]["StringLike"]["s3:prefix"][0];
    assert_eq!(lists, "lifeboat/team%2Fweb/*");
}
