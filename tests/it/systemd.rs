//! The systemd unit as systemd reads it: `systemd-analyze verify` in a scratch root holding the
//! system's own units, the unit and the built binary at `/usr/bin/lifeboat`; and the exposure
//! rating of `systemd-analyze security --offline=true`, printed, at most 3.0 ("OK").

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
    let root_arg = format!("--root={}", r.display());
    let out = analyze(&["verify", "--man=no", &root_arg, "lifeboat.service"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");

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
