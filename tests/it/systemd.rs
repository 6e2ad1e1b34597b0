//! The systemd units as systemd reads them: `systemd-analyze verify` in a scratch root holding
//! the system's own units, lifeboat's two units and the built binary at `/usr/bin/lifeboat`; and the exposure
//! rating of `systemd-analyze security --offline=true`, printed, at most 3.0 ("OK"); and the
//! unit's privilege model for real: `lifeboat backup` as user nobody with only
//! CAP_DAC_READ_SEARCH (setpriv) archives root-only files, and without it cannot even read the
//! configuration.

use std::path::Path;
use std::process::Command;

use crate::support::root;

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (scripts/bootstrap.sh installs systemd)")
}

#[test]
fn the_unit_verifies_in_a_root_with_the_binary() {
    let scratch = tempfile::tempdir().unwrap();
    let r = scratch.path();
    std::fs::create_dir_all(r.join("lib/systemd")).unwrap();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg("/lib/systemd/system")
        .arg(r.join("lib/systemd/"))
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::copy(
        root().join("systemd/lifeboat.service"),
        r.join("etc/systemd/system/lifeboat.service"),
    )
    .unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_lifeboat"), r.join("usr/bin/lifeboat")).unwrap();
    // A merged-/usr root, as Debian 12 and Amazon Linux 2023 are, with the `kill` that
    // `ExecReload=/bin/kill -HUP $MAINPID` runs.
    std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
    std::fs::copy("/bin/kill", r.join("usr/bin/kill")).unwrap();
    std::fs::copy(
        root().join("systemd/lifeboat-restore.service"),
        r.join("etc/systemd/system/lifeboat-restore.service"),
    )
    .unwrap();
    let root_arg = format!("--root={}", r.display());
    for unit in ["lifeboat.service", "lifeboat-restore.service"] {
        let out = analyze(&["verify", "--man=no", &root_arg, unit]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{unit}: {stderr}"
        );
    }

    // Without the binary, verify says so: the check above is real.
    std::fs::remove_file(r.join("usr/bin/lifeboat")).unwrap();
    let out = analyze(&["verify", "--man=no", &root_arg, "lifeboat.service"]);
    assert!(!out.status.success());
}

#[test]
fn the_unit_is_rated_ok_by_systemd_analyze_security() {
    let unit = root().join("systemd/lifeboat.service");
    let out = analyze(&["security", "--offline=true", unit.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no rating in: {text}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable rating: {line}"));
    println!("{}: {line}", Path::new(&unit).display());
    assert!(level <= 3.0, "{line}\n{text}");
}

/// Runs `lifeboat backup` as the unit runs the daemon: an unprivileged user (nobody), no groups,
/// and only the capabilities in `caps` (as `AmbientCapabilities=`), via util-linux's setpriv.
fn backup_as_nobody(
    caps: &str,
) -> (
    crate::support::Run,
    String,
    crate::support::Lifeboat,
    tempfile::TempDir,
) {
    use std::os::unix::fs::PermissionsExt;
    let server = crate::support::s3s_fs();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_owned();
    // Root-only data and configuration, as on a real host.
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("private")).unwrap();
    std::fs::write(data.join("private/secret.key"), b"root only").unwrap();
    std::fs::set_permissions(
        data.join("private/secret.key"),
        PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(data.join("private"), PermissionsExt::from_mode(0o700)).unwrap();
    let bucket = server.bucket("hardened");
    let lb = crate::support::Lifeboat::new(
        &dir,
        &server.endpoint,
        &crate::support::config_for(&bucket, &[&data], "", ""),
    );
    std::fs::set_permissions(&lb.config, PermissionsExt::from_mode(0o640)).unwrap();
    // Like StateDirectory=/RuntimeDirectory=: the only places it may write, owned by it.
    for d in ["run", "state"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
        std::os::unix::fs::chown(dir.join(d), Some(65534), Some(65534)).unwrap();
    }
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--no-new-privs",
        &format!("--inh-caps=-all{caps}"),
        &format!("--ambient-caps=-all{caps}"),
        &format!("--bounding-set=-all{caps}"),
        "--",
        env!("CARGO_BIN_EXE_lifeboat"),
        "backup",
        "--reason",
        "hardened",
    ])
    .env_clear()
    .env("PATH", "/usr/bin:/bin")
    .envs(lb.env())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let run = crate::support::wait_output(
        cmd.spawn().unwrap(),
        std::time::Duration::from_secs(120),
        &["backup as nobody"],
    );
    (run, bucket, lb, scratch)
}

fn is_root() -> bool {
    String::from_utf8_lossy(&Command::new("id").arg("-u").output().unwrap().stdout).trim() == "0"
}

#[test]
fn the_units_one_capability_is_enough_to_back_up_root_only_files() {
    if !is_root() {
        // setpriv can only drop to another user from root (CI runs as root).
        println!("skipped: needs root to switch users");
        return;
    }
    // With CAP_DAC_READ_SEARCH only: the root-only config is read, the 0600 file is archived.
    let (run, bucket, _lb, _dir) = backup_as_nobody(",+dac_read_search");
    assert_eq!(run.code, Some(0), "{run:#?}");
    let key = run.stored_key();
    let manifest_key = key.rsplit_once(".tar").unwrap().0.to_owned() + ".manifest.json";
    let manifest = String::from_utf8(crate::support::s3s_fs().get(&bucket, &manifest_key)).unwrap();
    assert!(manifest.contains("private/secret.key"), "{manifest}");
    assert!(!manifest.contains("Permission denied"), "{manifest}");

    // Without it, the same user cannot even read the configuration: the capability is what
    // makes the hardened unit work, and nothing else is needed.
    let (run, _, lb, _dir) = backup_as_nobody("");
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.contains(&lb.config.display().to_string()),
        "{}",
        run.stderr
    );
}
