//! The fleet simulation (`scripts/fleet-sim.sh`, `tests/tools/fleet_sim.py`) in small: 20
//! instances scaled in at once against tight token buckets (Auto Scaling 2/s, SendCommand 1/s),
//! on both paths (Run Command through the lifecycle queue, in batches), with the built binaries. The figures at N = 1,000 come from the script; these
//! check what must hold at any size: every instance archived, every action completed CONTINUE,
//! none completed without an archive, none left to time out.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::{bootstrap, root};

/// Runs the simulation with `args`; its report.
fn simulate(work: &Path, args: &[&str]) -> Value {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/tools/fleet_sim.py"))
        .args(["--lifeboat", env!("CARGO_BIN_EXE_lifeboat")])
        .arg("--bootstrap")
        .arg(bootstrap())
        .arg("--workdir")
        .arg(work)
        .args([
            "--n",
            "20",
            "--as-rate",
            "2",
            "--as-burst",
            "4",
            "--send-rate",
            "1",
            "--list-rate",
            "2",
            "--heartbeat-timeout",
            "120",
            "--limit",
            "240",
        ])
        .args(args)
        .output()
        .expect("run fleet_sim.py");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fleet_sim.py failed");
    serde_json::from_slice(&std::fs::read(work.join("report.json")).unwrap()).unwrap()
}

fn assert_every_instance_saved(report: &Value) {
    assert_eq!(report["archives"], 20, "{report:#}");
    assert_eq!(
        report["actions"],
        serde_json::json!({ "CONTINUE (completed)": 20 }),
        "{report:#}"
    );
    assert_eq!(report["completions_without_archive"], 0, "{report:#}");
}

#[test]
fn a_fleet_of_daemons_scaled_in_at_once_is_saved_and_completed() {
    let work = tempfile::tempdir().unwrap();
    let report = simulate(work.path(), &["--settle", "35"]);
    assert_every_instance_saved(&report);
}

#[test]
fn a_fleet_scaled_in_at_once_through_run_command_is_saved_and_completed() {
    let work = tempfile::tempdir().unwrap();
    let report = simulate(
        work.path(),
        &[
            "--path",
            "run-command",
            "--lambda-concurrency",
            "4",
            "--lambda-retry-delays",
            "5,10",
            "--batch-window",
            "2",
            "--visibility-timeout",
            "10",
        ],
    );
    assert_every_instance_saved(&report);
    assert_eq!(report["lambda"]["lifecycle_events"], 20, "{report:#}");
    // Through the lifecycle queue, in batches: fewer commands than instances.
    let sends = report["per_termination"]["SendCommand"]["calls"]
        .as_f64()
        .unwrap();
    assert!(
        sends <= 0.5,
        "{sends} SendCommand calls per termination: {report:#}"
    );
    assert_eq!(report["lambda"]["queue"]["dead"], 0, "{report:#}");
}
