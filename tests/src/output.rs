//! Reading what a command-line tool printed, as the stories check `storectl`'s answers.

use std::process::Output;

use serde_json::Value;

/// Everything a command printed, stdout then stderr (for failure messages).
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The stdout of a command that must have succeeded.
pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "storectl failed ({}): {}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The JSON stdout of a command that must have succeeded.
pub fn json(out: Output) -> Value {
    let stdout = ok(out);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}
