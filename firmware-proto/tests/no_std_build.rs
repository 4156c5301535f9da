//! The crate must keep building without std, for device firmware: this builds it with
//! `--no-default-features` in a target directory of its own, so any `std::` that slips in
//! fails the test run, not a firmware build months later.

use std::process::Command;

#[test]
fn builds_without_std() {
    let target_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-std-check");
    let out = Command::new(env!("CARGO"))
        .args(["build", "--locked", "-p", "firmware-proto", "--no-default-features", "--target-dir"])
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "firmware-proto does not build without std:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
