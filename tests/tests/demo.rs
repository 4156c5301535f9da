//! The one-command demo runs in CI: the built `demo` binary plays its day in a temporary folder
//! with `--clean`, exits 0, prints the summary with every store agreeing with the cloud, removes
//! its data folders, and takes well under two minutes.

use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::demo::report::header;
use e2e_tests::store::PRODUCTS;
use e2e_tests::workspace_bin;

#[test]
fn the_demo_plays_its_day_and_every_replica_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let started = Instant::now();
    let out = Command::new(workspace_bin("demo")).arg("--dir").arg(&data).arg("--clean").output().unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "demo exited with {}:\n{stdout}\n{stderr}", out.status);
    let skus: Vec<&str> = PRODUCTS.iter().map(|p| p.sku).collect();
    assert!(stdout.contains(&header(&skus)), "no summary table header in:\n{stdout}");
    for store in ["s1", "s2"] {
        let row = stdout
            .lines()
            .map(str::trim_start)
            .find(|l| l.starts_with(&format!("{store} ")) && l.contains("/"))
            .unwrap_or_else(|| panic!("no summary row for {store} in:\n{stdout}"));
        assert!(row.contains(" agree ") && !row.contains("differ"), "{store} does not agree: {row}");
    }
    assert!(stdout.contains("RESULT: every replica agrees"), "{stdout}");
    assert!(!data.exists(), "--clean left {}", data.display());
    assert!(took < Duration::from_secs(120), "the demo took {took:?}");
}
