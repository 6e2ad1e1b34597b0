//! Restore on launch (`lifeboat restore-on-launch`, `[restore]`): a replacement instance takes
//! over the newest complete archive of its group, verified, once; a fresh group goes on or fails
//! as configured; a tampered archive is not applied. Real binary, moto's S3, the IMDS emulator.

use std::path::Path;
use std::time::Duration;

use crate::support::{Imds, Lifeboat, Run, Server, config_for, moto, wait_output, write};

fn on(lb: &Lifeboat, imds: &Imds, args: &[&str]) -> Run {
    let mut cmd = lb.command(args);
    cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint);
    wait_output(cmd.spawn().unwrap(), Duration::from_secs(120), args)
}

fn group(test: &str) -> String {
    format!("launch-{test}-{}", std::process::id())
}

/// An instance of `group` whose config archives `data` and restores into `target` at launch.
fn instance(
    dir: &Path,
    server: &Server,
    bucket: &str,
    data: &Path,
    target: &Path,
    restore_extra: &str,
) -> Lifeboat {
    std::fs::create_dir_all(dir).unwrap();
    Lifeboat::new(
        dir,
        &server.endpoint,
        &format!(
            "{}[restore]\non_launch = true\nto = {:?}\n{restore_extra}\n",
            config_for(bucket, &[data], "", ""),
            target.display().to_string()
        ),
    )
}

fn s3_time(server: &Server, bucket: &str, key: &str) -> i64 {
    crate::support::rt()
        .block_on(server.client().head_object().bucket(bucket).key(key).send())
        .unwrap()
        .last_modified()
        .unwrap()
        .secs()
}

#[test]
fn a_replacement_restores_the_newest_archive_of_its_group_once() {
    let server = moto();
    let bucket = server.bucket("launch");
    let group = group("newest");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let target = dir.path().join("target");
    // An older archive from one instance, then a newer one from another.
    write(&data.join("app.db"), b"old state");
    let old = Imds::start("i-0000000000000old0", &group);
    let lb_old = instance(&dir.path().join("old"), server, &bucket, &data, &target, "");
    let old_key = on(&lb_old, &old, &["backup"]).stored_key();
    let old_time = s3_time(server, &bucket, &old_key);
    crate::support::eventually(
        "S3's clock to pass the older archive",
        Duration::from_secs(5),
        || (crate::support::unix_now() as i64 > old_time).then_some(()),
    );
    write(&data.join("app.db"), b"newest state");
    write(&data.join("conf/app.toml"), b"answer = 42\n");
    let a = Imds::start("i-0000000000000aaa0", &group);
    let lb_a = instance(&dir.path().join("a"), server, &bucket, &data, &target, "");
    let key = on(&lb_a, &a, &["backup"]).stored_key();

    // The replacement restores the newest, verified, where the data was archived from (under
    // `to`).
    let b = Imds::start("i-0000000000000bbb0", &group);
    let lb_b = instance(&dir.path().join("b"), server, &bucket, &data, &target, "");
    let out = on(&lb_b, &b, &["restore-on-launch"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains(&key), "{out:#?}");
    let restored = target.join(data.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(restored.join("app.db")).unwrap(),
        b"newest state"
    );
    assert_eq!(
        std::fs::read(restored.join("conf/app.toml")).unwrap(),
        b"answer = 42\n"
    );

    // Once per instance: a reboot does not restore over what the instance has written since.
    std::fs::write(restored.join("app.db"), b"written after launch").unwrap();
    let again = on(&lb_b, &b, &["restore-on-launch"]);
    assert_eq!(again.code, Some(0), "{again:#?}");
    assert!(again.stdout.contains("already restored"), "{again:#?}");
    assert_eq!(
        std::fs::read(restored.join("app.db")).unwrap(),
        b"written after launch"
    );
}

#[test]
fn a_fresh_group_starts_without_data_or_fails_as_configured() {
    let server = moto();
    let bucket = server.bucket("launch-fresh");
    let group = group("fresh");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let target = dir.path().join("target");
    let imds = Imds::start("i-0000000000000fre0", &group);

    let lb = instance(
        &dir.path().join("continue"),
        server,
        &bucket,
        &data,
        &target,
        "",
    );
    let out = on(&lb, &imds, &["restore-on-launch"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout
            .contains(&format!("no complete archive of group {group}"))
            && out.stdout.contains("starting without data"),
        "{out:#?}"
    );

    let lb = instance(
        &dir.path().join("abandon"),
        server,
        &bucket,
        &data,
        &target,
        "if_none = \"abandon\"",
    );
    let out = on(&lb, &imds, &["restore-on-launch"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains(&group) && out.stderr.contains("if_none"),
        "{out:#?}"
    );
    assert!(!target.exists(), "nothing was written");

    // Outside any group there is no predecessor: another standalone host's data is not this
    // one's, even when there is some.
    let host = Imds::start("i-0000000000000sta0", "");
    let lb_host = instance(
        &dir.path().join("host"),
        server,
        &bucket,
        &data,
        &target,
        "",
    );
    write(&data.join("app.db"), b"another host's");
    on(&lb_host, &host, &["backup"]).stored_key();
    let other = Imds::start("i-0000000000000sta1", "");
    let lb = instance(
        &dir.path().join("other"),
        server,
        &bucket,
        &data,
        &target,
        "",
    );
    let out = on(&lb, &other, &["restore-on-launch"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("not in an Auto Scaling group"),
        "{out:#?}"
    );
    assert!(!target.exists(), "nothing was written");
}

#[test]
fn a_tampered_archive_is_not_applied_and_the_launch_can_retry() {
    let server = moto();
    let bucket = server.bucket("launch-tampered");
    let group = group("tampered");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let target = dir.path().join("target");
    write(&data.join("app.db"), b"state");
    let a = Imds::start("i-0000000000000aaa1", &group);
    let lb_a = instance(&dir.path().join("a"), server, &bucket, &data, &target, "");
    let key = on(&lb_a, &a, &["backup"]).stored_key();
    // Someone replaces the archive (its manifest still names the original's SHA-256).
    let mut bytes = server.get(&bucket, &key);
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    server.put(&bucket, &key, bytes);

    let b = Imds::start("i-0000000000000bbb1", &group);
    let lb_b = instance(&dir.path().join("b"), server, &bucket, &data, &target, "");
    let out = on(&lb_b, &b, &["restore-on-launch"]);
    assert_eq!(out.code, Some(3), "{out:#?}");
    let restored = target.join(data.strip_prefix("/").unwrap());
    assert!(!restored.join("app.db").exists(), "{out:#?}");
    // Not recorded as done: the next attempt tries again.
    let again = on(&lb_b, &b, &["restore-on-launch"]);
    assert_eq!(again.code, Some(3), "{again:#?}");
}

/// A launch hook holds the new instance in Pending:Wait: the restore runs, the action is kept
/// alive and completed CONTINUE once the data is in place; an archive that fails verification
/// is not applied and the action is completed as `on_failure` says (ABANDON); with nothing to
/// restore and `if_none = "abandon"` it is completed ABANDON.
#[test]
fn a_launch_hook_is_completed_continue_once_the_data_is_in_place() {
    let server = moto();
    let bucket = server.bucket("launch-hook");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let target = dir.path().join("target");
    write(&data.join("app.db"), b"carried over");
    // A group of one instance with a launch hook; that instance saves its data.
    let (group, instances, topic) = crate::support::group_of(server, "launch-hook", 1, 300);
    crate::support::add_launch_hook(server, &group, 60, "ABANDON");
    let a = Imds::start(&instances[0], &group);
    let lb_a = instance(&dir.path().join("a"), server, &bucket, &data, &target, "");
    let key = on(&lb_a, &a, &["backup"]).stored_key();
    // Scale out: the new instance waits in Pending:Wait.
    crate::support::set_capacity(server, &group, 2);
    let waiting = |state: &str| crate::support::instances_in(server, &group, Some(state));
    let new = waiting("Pending:Wait");
    assert_eq!(new.len(), 1, "{new:?}");
    let b = Imds::start(&new[0], &group);
    let lb_b = instance(
        &dir.path().join("b"),
        server,
        &bucket,
        &data,
        &target,
        &format!("\n[sns]\ntopic_arn = \"{topic}\""),
    );
    let out = on(&lb_b, &b, &["restore-on-launch"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains(&key) && out.stdout.contains("CONTINUE"),
        "{out:#?}"
    );
    let restored = target.join(data.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(restored.join("app.db")).unwrap(),
        b"carried over"
    );
    let action = crate::support::finished_action(server, &new[0]);
    assert_eq!(action["result"], "CONTINUE", "{action}");
    assert_eq!(action["ended_by"], "completed", "{action}");
    assert!(waiting("InService").contains(&new[0]));
    // The report says which archive went where.
    let reports = crate::support::notifications(server, &topic);
    let (subject, message, _) = reports
        .iter()
        .find(|(_, m, _)| m["instance_id"] == new[0].as_str())
        .expect("a report for the new instance");
    assert!(subject.contains("data restored at launch"), "{subject}");
    assert_eq!(message["status"], "restored", "{message}");
    assert_eq!(
        message["object_url"],
        format!("s3://{bucket}/{key}"),
        "{message}"
    );
    assert_eq!(
        message["restored_to"],
        target.display().to_string(),
        "{message}"
    );
    assert_eq!(message["lifecycle_result"], "CONTINUE", "{message}");

    // The archive is tampered with; the next launch does not apply it, and the action follows
    // restore.on_failure (default "abandon").
    let mut bytes = server.get(&bucket, &key);
    bytes[100] ^= 0xff;
    server.put(&bucket, &key, bytes);
    crate::support::set_capacity(server, &group, 3);
    let third = waiting("Pending:Wait");
    assert_eq!(third.len(), 1, "{third:?}");
    let d = Imds::start(&third[0], &group);
    let target_d = dir.path().join("target-d");
    let lb_d = instance(&dir.path().join("d"), server, &bucket, &data, &target_d, "");
    let out = on(&lb_d, &d, &["restore-on-launch"]);
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(
        !target_d
            .join(data.strip_prefix("/").unwrap())
            .join("app.db")
            .exists()
    );
    let action = crate::support::finished_action(server, &third[0]);
    assert_eq!(action["result"], "ABANDON", "{action}");

    // Another launch into a group with nothing to restore and if_none = "abandon": ABANDON.
    let (empty, _, _) = crate::support::group_of(server, "launch-empty", 0, 300);
    crate::support::add_launch_hook(server, &empty, 60, "CONTINUE");
    crate::support::set_capacity(server, &empty, 1);
    let fresh = crate::support::instances_in(server, &empty, None)[0].clone();
    let c = Imds::start(&fresh, &empty);
    let lb_c = instance(
        &dir.path().join("c"),
        server,
        &bucket,
        &data,
        &dir.path().join("target-c"),
        "if_none = \"abandon\"",
    );
    let out = on(&lb_c, &c, &["restore-on-launch"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    let action = crate::support::finished_action(server, &fresh);
    assert_eq!(action["result"], "ABANDON", "{action}");
}

/// `[schedule] every`: the daemon snapshots between terminations; an instance that then dies
/// without notice (kill -9, no termination) still hands its data to the replacement.
#[test]
fn a_scheduled_snapshot_survives_a_crash_and_a_launch_restores_it() {
    let server = moto();
    let (group, instance_id, topic) = crate::support::group_with_hook(server, "snapshot", 60);
    let imds = Imds::start(&instance_id, &group);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let target = dir.path().join("target");
    write(&data.join("app.db"), b"snapshotted between terminations");
    let bucket = server.bucket("snapshot");
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    let lb = Lifeboat::new(
        &dir.path().join("a"),
        &server.endpoint,
        &format!(
            "{}[schedule]\nevery = \"1s\"\n",
            crate::support::daemon_config(&bucket, &data, &topic, "")
        ),
    );
    let mut daemon = crate::support::start_daemon(&lb, &imds, &[]);
    // A complete snapshot: the archive and its manifest.
    let key = crate::support::eventually("a scheduled snapshot", Duration::from_secs(60), || {
        let keys = server.keys(&bucket);
        keys.iter()
            .find(|k| {
                k.ends_with("-scheduled.tar") && keys.contains(&k.replace(".tar", ".manifest.json"))
            })
            .cloned()
    });
    // The instance dies without a notice.
    daemon.child().kill().unwrap();
    daemon.child().wait().unwrap();
    drop(daemon);

    let b = Imds::start("i-0000000000000bbb2", &group);
    let lb_b = instance(&dir.path().join("b"), server, &bucket, &data, &target, "");
    let out = on(&lb_b, &b, &["restore-on-launch"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("-scheduled.tar"),
        "{out:#?} (first snapshot {key})"
    );
    let restored = target.join(data.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(restored.join("app.db")).unwrap(),
        b"snapshotted between terminations"
    );
}

/// `lifeboat prune` with `[retention] keep_last = 1`: a dry run deletes nothing; `--apply`
/// deletes what the rules do not keep, with its manifest, and keeps the instance's newest
/// complete archive even when a newer one has no manifest.
#[test]
fn prune_keeps_what_the_rules_and_the_newest_complete_archive_need() {
    let server = moto();
    let bucket = server.bucket("prune");
    let group = group("prune");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.db"), b"x");
    let a = Imds::start("i-0000000000000aaa3", &group);
    let lb = instance(
        &dir.path().join("a"),
        server,
        &bucket,
        &data,
        &dir.path().join("target"),
        "",
    );
    // Three backups, each stored in a later second than the one before.
    let mut keys: Vec<String> = Vec::new();
    for _ in 0..3 {
        if let Some(last) = keys.last() {
            let t = s3_time(server, &bucket, last);
            crate::support::eventually("the next second", Duration::from_secs(5), || {
                (crate::support::unix_now() as i64 > t).then_some(())
            });
        }
        keys.push(on(&lb, &a, &["backup"]).stored_key());
    }
    let manifest = |k: &str| k.rsplit_once(".tar").unwrap().0.to_owned() + ".manifest.json";
    // The newest lost its manifest (a job that failed after its upload).
    crate::support::rt()
        .block_on(
            server
                .client()
                .delete_object()
                .bucket(&bucket)
                .key(manifest(&keys[2]))
                .send(),
        )
        .unwrap();
    std::fs::create_dir_all(dir.path().join("operator")).unwrap();
    let retained = Lifeboat::new(
        &dir.path().join("operator"),
        &server.endpoint,
        &format!(
            "{}[retention]\nkeep_last = 1\n",
            config_for(&bucket, &[&data], "", "")
        ),
    );
    let dry = on(&retained, &a, &["prune"]);
    assert_eq!(dry.code, Some(0), "{dry:#?}");
    assert!(
        dry.stdout
            .contains(&format!("would delete  complete     {}", keys[0])),
        "{dry:#?}"
    );
    // Three archives, two manifests, three job logs.
    assert_eq!(server.keys(&bucket).len(), 8, "a dry run deletes nothing");

    let out = on(&retained, &a, &["prune", "--apply"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("(keep_last)") && out.stdout.contains("(newest complete)"),
        "{out:#?}"
    );
    let mut left = server.keys(&bucket);
    left.sort();
    let log = |k: &str| k.rsplit_once(".tar").unwrap().0.to_owned() + ".log";
    // The archive goes with its manifest and its job log.
    let mut want = vec![
        keys[1].clone(),
        manifest(&keys[1]),
        log(&keys[1]),
        keys[2].clone(),
        log(&keys[2]),
    ];
    want.sort();
    assert_eq!(left, want);

    // Without a rule, prune refuses (exit 2) rather than keep only the newest.
    let out = on(&lb, &a, &["prune"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains("retention.keep_last"), "{out:#?}");
}

/// Two replacements launched at once both restore: reading is shared, nothing is consumed.
#[test]
fn two_launches_at_once_both_restore() {
    let server = moto();
    let bucket = server.bucket("launch-twice");
    let group = group("twice");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.db"), &crate::support::noise(3 << 20, 5));
    let a = Imds::start("i-0000000000000aaa4", &group);
    let lb_a = instance(
        &dir.path().join("a"),
        server,
        &bucket,
        &data,
        &dir.path().join("t"),
        "",
    );
    on(&lb_a, &a, &["backup"]).stored_key();
    let launches: Vec<_> = ["i-0000000000000bbb4", "i-0000000000000ccc4"]
        .into_iter()
        .map(|id| {
            let imds = Imds::start(id, &group);
            let target = dir.path().join(format!("target-{id}"));
            let lb = instance(&dir.path().join(id), server, &bucket, &data, &target, "");
            let mut cmd = lb.command(&["restore-on-launch"]);
            cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint);
            (cmd.spawn().unwrap(), imds, target)
        })
        .collect();
    for (child, _imds, target) in launches {
        let out = wait_output(child, Duration::from_secs(120), &["restore-on-launch"]);
        assert_eq!(out.code, Some(0), "{out:#?}");
        let restored = target.join(data.strip_prefix("/").unwrap()).join("app.db");
        assert_eq!(
            std::fs::read(restored).unwrap(),
            crate::support::noise(3 << 20, 5)
        );
    }
}

/// A member of the group writes what replacements restore, so a launch restores only what the
/// launching instance itself backs up (`backup.paths`, a file as well as a directory): whatever
/// else the archive holds is left out and named, and set-id bits are dropped even as root.
#[test]
fn a_launch_restores_only_its_own_paths_and_no_set_id_bits() {
    use std::os::unix::fs::PermissionsExt;
    let server = moto();
    let bucket = server.bucket("launch-confined");
    let group = group("confined");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let settings = dir.path().join("settings.conf");
    let elsewhere = dir.path().join("cron.d");
    let target = dir.path().join("target");
    write(&data.join("app.db"), b"state");
    write(&data.join("tool"), b"#!/bin/sh\n");
    std::fs::set_permissions(data.join("tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    write(&settings, b"mode = fast\n");
    write(&elsewhere.join("job"), b"* * * * * root sh -c 'anything'\n");
    // A compromised member archives more than the group's paths.
    let a = Imds::start("i-0000000000000aaa4", &group);
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let lb_a = Lifeboat::new(
        &a_dir,
        &server.endpoint,
        &config_for(&bucket, &[&data, &settings, &elsewhere], "", ""),
    );
    on(&lb_a, &a, &["backup"]).stored_key();

    let b = Imds::start("i-0000000000000bbb4", &group);
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let lb_b = Lifeboat::new(
        &b_dir,
        &server.endpoint,
        &format!(
            "{}[restore]\non_launch = true\nto = {:?}\n",
            config_for(&bucket, &[&data, &settings], "", ""),
            target.display().to_string()
        ),
    );
    let out = on(&lb_b, &b, &["restore-on-launch"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let under = |p: &Path| target.join(p.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(under(&data).join("app.db")).unwrap(),
        b"state"
    );
    assert_eq!(std::fs::read(under(&settings)).unwrap(), b"mode = fast\n");
    assert!(!under(&elsewhere).exists(), "{out:#?}");
    let name = elsewhere.strip_prefix("/").unwrap().display().to_string();
    assert!(
        out.stderr.contains("not in backup.paths") && out.stderr.contains(&name),
        "{out:#?}"
    );
    let mode = std::fs::metadata(under(&data).join("tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "set-id bits dropped: {mode:o}");
}

/// `[restore.paths]` puts an archived path somewhere else (a bigger volume, a scratch copy);
/// the other paths go where `to` says.
#[test]
fn restore_paths_put_an_archived_path_where_configured() {
    let server = moto();
    let bucket = server.bucket("launch-mapped");
    let group = group("mapped");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let logs = dir.path().join("logs");
    let mapped = dir.path().join("volume/app");
    let target = dir.path().join("target");
    write(&data.join("app.db"), b"state");
    write(&data.join("nested/deep.bin"), b"deep");
    write(&logs.join("app.log"), b"log line\n");
    let config = |restore: &str| {
        format!(
            "{}[restore]\non_launch = true\nto = {:?}\n{restore}",
            config_for(&bucket, &[&data, &logs], "", ""),
            target.display().to_string()
        )
    };
    let a = Imds::start("i-0000000000000aaa5", &group);
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let lb_a = Lifeboat::new(&a_dir, &server.endpoint, &config(""));
    on(&lb_a, &a, &["backup"]).stored_key();

    let b = Imds::start("i-0000000000000bbb5", &group);
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let lb_b = Lifeboat::new(
        &b_dir,
        &server.endpoint,
        &config(&format!(
            "\n[restore.paths]\n{:?} = {:?}\n",
            data.display().to_string(),
            mapped.display().to_string()
        )),
    );
    let out = on(&lb_b, &b, &["restore-on-launch"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(std::fs::read(mapped.join("app.db")).unwrap(), b"state");
    assert_eq!(
        std::fs::read(mapped.join("nested/deep.bin")).unwrap(),
        b"deep"
    );
    let under = |p: &Path| target.join(p.strip_prefix("/").unwrap());
    assert!(!under(&data).exists(), "{out:#?}");
    assert_eq!(
        std::fs::read(under(&logs).join("app.log")).unwrap(),
        b"log line\n"
    );

    // A mapping for a path the instance does not back up is a configuration error that names it.
    let c_dir = dir.path().join("c");
    std::fs::create_dir_all(&c_dir).unwrap();
    let lb_c = Lifeboat::new(
        &c_dir,
        &server.endpoint,
        &config("\n[restore.paths]\n\"/not/backed/up\" = \"/somewhere\"\n"),
    );
    let out = on(&lb_c, &b, &["config", "check"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(
        out.stderr.contains("restore.paths") && out.stderr.contains("/not/backed/up"),
        "{out:#?}"
    );
}

/// The boot unit and the Run Command path may start a launch restore at the same moment on
/// one instance: one restores, the other waits for it and finds it done.
#[test]
fn two_restores_on_one_instance_restore_once() {
    let server = moto();
    let bucket = server.bucket("launch-once");
    let group = group("once");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let target = dir.path().join("target");
    write(&data.join("app.db"), &crate::support::noise(8 << 20, 7));
    let a = Imds::start("i-0000000000000aaa6", &group);
    let lb_a = instance(&dir.path().join("a"), server, &bucket, &data, &target, "");
    on(&lb_a, &a, &["backup"]).stored_key();

    let b = Imds::start("i-0000000000000bbb6", &group);
    let lb_b = instance(&dir.path().join("b"), server, &bucket, &data, &target, "");
    let spawn = || {
        let mut cmd = lb_b.command(&["restore-on-launch"]);
        cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &b.endpoint);
        cmd.spawn().unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let outs =
        [first, second].map(|c| wait_output(c, Duration::from_secs(120), &["restore-on-launch"]));
    for out in &outs {
        assert_eq!(out.code, Some(0), "{out:#?}");
    }
    let restored = outs
        .iter()
        .filter(|o| o.stdout.contains("restoring s3://"))
        .count();
    let found_done = outs
        .iter()
        .filter(|o| o.stdout.contains("already restored"))
        .count();
    assert_eq!((restored, found_done), (1, 1), "{outs:#?}");
}

/// `retention.after_backup`: each successful backup, once done, prunes its own instance's older
/// archives by the rules, and nobody else's.
#[test]
fn a_backup_prunes_its_own_older_archives_when_configured() {
    let server = moto();
    let bucket = server.bucket("prune-after");
    let group = group("prune-after");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.db"), b"x");
    // Another instance of the group, which does not prune.
    let other = Imds::start("i-0000000000000ccc7", &group);
    let lb_other = instance(
        &dir.path().join("other"),
        server,
        &bucket,
        &data,
        &dir.path().join("t"),
        "",
    );
    let other_key = on(&lb_other, &other, &["backup"]).stored_key();
    let other_time = s3_time(server, &bucket, &other_key);

    let a = Imds::start("i-0000000000000aaa7", &group);
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let lb = Lifeboat::new(
        &a_dir,
        &server.endpoint,
        &format!(
            "{}[retention]\nkeep_last = 1\nafter_backup = true\n",
            config_for(&bucket, &[&data], "", "")
        ),
    );
    let mut keys: Vec<String> = Vec::new();
    let mut last_time = other_time;
    for _ in 0..3 {
        crate::support::eventually("the next second", Duration::from_secs(5), || {
            (crate::support::unix_now() as i64 > last_time).then_some(())
        });
        let out = on(&lb, &a, &["backup"]);
        assert_eq!(out.code, Some(0), "{out:#?}");
        keys.push(out.stored_key());
        last_time = s3_time(server, &bucket, keys.last().unwrap());
    }
    let manifest = |k: &str| k.rsplit_once(".tar").unwrap().0.to_owned() + ".manifest.json";
    let mut left = server.keys(&bucket);
    left.sort();
    let log = |k: &str| k.rsplit_once(".tar").unwrap().0.to_owned() + ".log";
    let mut want = vec![
        other_key.clone(),
        manifest(&other_key),
        log(&other_key),
        keys[2].clone(),
        manifest(&keys[2]),
        log(&keys[2]),
    ];
    want.sort();
    assert_eq!(left, want);

    // Without a rule, after_backup is a configuration error that names the key.
    let bad = Lifeboat::new(
        &a_dir,
        &server.endpoint,
        &format!(
            "{}[retention]\nafter_backup = true\n",
            config_for(&bucket, &[&data], "", "")
        ),
    );
    let out = on(&bad, &a, &["config", "check"]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains("retention.after_backup"), "{out:#?}");
}

/// Instance metadata tags are off by default on EC2: the group then comes from Auto Scaling
/// (DescribeAutoScalingInstances), so an instance's archives are filed under its group, not
/// `standalone/`, and a replacement finds them.
#[test]
fn with_metadata_tags_off_archives_are_filed_and_found_under_the_group() {
    let server = moto();
    let bucket = server.bucket("launch-notags");
    let (group, instances, _topic) = crate::support::group_of(server, "launch-notags", 2, 300);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let target = dir.path().join("target");
    write(&data.join("app.db"), b"filed by group");
    let a = Imds::start(&instances[0], &group);
    a.set(r#"{"tags_enabled": false}"#);
    let lb_a = instance(&dir.path().join("a"), server, &bucket, &data, &target, "");
    let key = on(&lb_a, &a, &["backup"]).stored_key();
    assert!(
        key.starts_with(&format!("backups/{group}/")),
        "{key} is not under the group"
    );

    let b = Imds::start(&instances[1], &group);
    b.set(r#"{"tags_enabled": false}"#);
    let lb_b = instance(&dir.path().join("b"), server, &bucket, &data, &target, "");
    let out = on(&lb_b, &b, &["restore-on-launch"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains(&key), "{out:#?}");
    assert_eq!(
        std::fs::read(target.join(data.strip_prefix("/").unwrap()).join("app.db")).unwrap(),
        b"filed by group"
    );
}

/// The `lifeboat-restore` document passes `--hook`: on an instance whose configuration does not
/// restore at launch, the launch action is still completed (CONTINUE, nothing restored) instead
/// of waiting out the hook's timeout.
#[test]
fn a_named_hook_is_completed_even_when_on_launch_is_off() {
    let server = moto();
    let bucket = server.bucket("launch-off");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(&data.join("app.db"), b"x");
    let (group, _instances, _topic) = crate::support::group_of(server, "launch-off", 1, 300);
    crate::support::add_launch_hook(server, &group, 300, "ABANDON");
    crate::support::set_capacity(server, &group, 2);
    let waiting = crate::support::instances_in(server, &group, Some("Pending:Wait"));
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    let imds = Imds::start(&waiting[0], &group);
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let lb = Lifeboat::new(
        &dir.path().join("b"),
        &server.endpoint,
        &config_for(&bucket, &[&data], "", ""),
    );
    let out = on(
        &lb,
        &imds,
        &["restore-on-launch", "--hook", "lifeboat-launch"],
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("restore.on_launch is off") && out.stdout.contains("CONTINUE"),
        "{out:#?}"
    );
    let action = crate::support::finished_action(server, &waiting[0]);
    assert_eq!(action["result"], "CONTINUE", "{action}");
    assert_eq!(action["ended_by"], "completed", "{action}");
}
