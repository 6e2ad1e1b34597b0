//! The `bootstrap` binary at cold start: a bad variable stops it before it serves any event, with
//! the variable's name in the error (the end-to-end tests live in the root crate's `tests/it`).

use std::process::Command;

#[test]
fn a_bad_variable_is_named_at_cold_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_bootstrap"))
        .env_clear()
        .env("LIFEBOAT_ON_FAILURE", "RETRY")
        .env("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("LIFEBOAT_ON_FAILURE") && text.contains("CONTINUE or ABANDON"),
        "{text}"
    );
}
