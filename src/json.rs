//! `--json`: each command's outcome as one JSON document on stdout (one line), with stable field
//! names (README, "JSON output"); messages and errors stay on stderr, and exit codes are the
//! same as without it. The documents are built here from what the commands already have.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde_json::{Value, json};

use crate::catalog::BackupEntry;
use crate::doctor::{Check, Outcome};

static WANTED: AtomicBool = AtomicBool::new(false);

/// Turns JSON output on (`--json`), for the whole process.
pub fn set(on: bool) {
    WANTED.store(on, Ordering::Relaxed);
}

/// Whether the command prints JSON instead of text.
pub fn wanted() -> bool {
    WANTED.load(Ordering::Relaxed)
}

/// Prints `value` as one line of JSON.
pub fn print(value: &impl Serialize) {
    match serde_json::to_string(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("lifeboat: the JSON output could not be written: {e}"),
    }
}

/// `list`: the archives, newest first.
pub fn list(bucket: &str, prefix: &str, entries: &[BackupEntry]) -> Value {
    let archives: Vec<Value> = entries.iter().map(archive).collect();
    json!({ "bucket": bucket, "prefix": prefix, "archives": archives })
}

/// One archive of a listing.
pub fn archive(e: &BackupEntry) -> Value {
    let (time, reason) = crate::manifest::name_parts(&e.name).unzip();
    json!({
        "key": e.key,
        "time": time.map(crate::manifest::rfc3339),
        "reason": reason,
        "status": e.status.name(),
        "partial": e.status == crate::catalog::BackupStatus::Partial,
        "size": e.size,
        "group": e.group,
        "instance_id": e.instance_id,
        "stored_at": time::OffsetDateTime::from_unix_timestamp(e.modified)
            .ok()
            .filter(|_| e.modified > 0)
            .map(crate::manifest::rfc3339),
    })
}

/// `doctor`: every check, and whether all passed (no `fail`).
pub fn doctor(checks: &[Check]) -> Value {
    let checks: Vec<Value> = checks
        .iter()
        .map(|c| {
            let (outcome, detail, fix) = match &c.outcome {
                Outcome::Ok(what) => ("ok", what, None),
                Outcome::Warn(what, fix) => ("warn", what, Some(fix)),
                Outcome::Fail(what, fix) => ("fail", what, Some(fix)),
            };
            json!({ "name": c.name, "outcome": outcome, "detail": detail, "fix": fix })
        })
        .collect();
    let ok = checks.iter().all(|c| c["outcome"] != "fail");
    json!({ "ok": ok, "checks": checks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_says_its_time_reason_and_status() {
        let e = BackupEntry {
            key: "p/web/i-1/20261127T080000Z-scale-in.tar.gz".into(),
            size: 42,
            group: "web".into(),
            instance_id: "i-1".into(),
            name: "20261127T080000Z-scale-in.tar.gz".into(),
            status: crate::catalog::BackupStatus::Partial,
            modified: 1_795_000_000,
        };
        let v = archive(&e);
        assert_eq!(v["time"], "2026-11-27T08:00:00Z");
        assert_eq!(v["reason"], "scale-in");
        assert_eq!(v["status"], "partial");
        assert_eq!(v["partial"], true);
        assert_eq!(v["size"], 42);
        assert!(v["stored_at"].as_str().unwrap().ends_with('Z'));
    }
}
