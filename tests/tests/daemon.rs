//! The `edge-agent` and `storectl` binaries as an operator meets them: a good config starts
//! and stops cleanly on SIGTERM or SIGINT; bad configs, bad ledger files, a data folder the
//! service user cannot write, and bad arguments each get a clear message and a distinct exit
//! code, never a panic.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use e2e_tests::{signal, workspace_bin, Running, SIGINT, SIGTERM};

fn write_config(dir: &Path, data_dir: &Path) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[ledger]\ndata_dir = \"{}\"\nshutdown_timeout_ms = 5000\n",
            data_dir.display()
        ),
    )
    .unwrap();
    path
}

fn edge_agent(args: &[&str], config: &Path) -> Output {
    Command::new(workspace_bin("edge-agent")).args(args).arg("--config").arg(config).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_no_panic(out: &Output) {
    assert!(!stderr(out).contains("panicked"), "{}", stderr(out));
}

#[test]
fn starts_and_stops_cleanly_on_sigterm_and_sigint() {
    for sig in [SIGTERM, SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &dir.path().join("data"));
        let mut cmd = Command::new(workspace_bin("edge-agent"));
        cmd.arg("run").arg("--config").arg(&config);
        let mut run = Running::spawn(cmd, true);
        run.wait_for("edge-agent ready", Duration::from_secs(30));
        // A second daemon on the same data folder is refused, and the first keeps its socket.
        let second = edge_agent(&["run"], &config);
        assert_eq!(second.status.code(), Some(75), "{}", stderr(&second));
        assert!(stderr(&second).contains("already running"), "{}", stderr(&second));
        assert!(dir.path().join("data/control.sock").exists());
        let sent = Instant::now();
        signal(&run.child, sig);
        let lines = run.wait_for("edge-agent stopped cleanly", Duration::from_secs(10));
        let status = run.child.wait().unwrap();
        assert!(status.success(), "exit status {status}; log:\n{}", lines.join("\n"));
        assert!(sent.elapsed() < Duration::from_secs(10));
        let verify = Command::new(workspace_bin("storectl"))
            .arg("--config")
            .arg(&config)
            .args(["ledger", "verify"])
            .output()
            .unwrap();
        assert!(verify.status.success(), "{}", stderr(&verify));
    }
}

#[test]
fn default_config_passes_check_config() {
    let out = Command::new(workspace_bin("edge-agent")).arg("print-default-config").output().unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let check = edge_agent(&["check-config"], &path);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[store]\nid = \"s1\"\ncurrency = \"EUR\"\nbogus = true\n", "key `store.bogus`", "unknown field"),
        (
            "[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[ledger]\nbatch_max = \"lots\"\n",
            "key `ledger.batch_max`",
            "invalid type",
        ),
        ("[store]\nid = \"s1\"\ncurrency = 978\n", "key `store.currency`", "invalid type"),
        ("[store]\nid = \"store/1\"\ncurrency = \"EUR\"\n", "key `store.id`", "'/'"),
        ("[store\n", "config.toml", "line 1"),
    ];
    for (text, key, what) in cases {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        for cmd in ["check-config", "run"] {
            let out = edge_agent(&[cmd], &path);
            assert_eq!(out.status.code(), Some(64), "{cmd} with {text:?}: {}", stderr(&out));
            assert!(stderr(&out).contains(key) && stderr(&out).contains(what), "{cmd}: {}", stderr(&out));
            assert_no_panic(&out);
        }
    }
    let out = edge_agent(&["check-config"], &dir.path().join("missing.toml"));
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("missing.toml") && stderr(&out).contains("cannot read"), "{}", stderr(&out));
}

#[test]
fn corrupt_or_foreign_ledger_files_are_refused_not_touched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let config = write_config(dir.path(), &data);
    let ledger = data.join("ledger.db");

    let garbage: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&ledger, &garbage).unwrap();
    let out = edge_agent(&["run"], &config);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a readable SQLite database"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&ledger).unwrap(), garbage, "the file must be left as it was");
    let out = Command::new(workspace_bin("storectl"))
        .arg("--data-dir")
        .arg(&data)
        .args(["stock", "show", "A"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert_no_panic(&out);

    std::fs::remove_file(&ledger).unwrap();
    let conn = rusqlite::Connection::open(&ledger).unwrap();
    conn.execute_batch("CREATE TABLE playlist (song TEXT)").unwrap();
    drop(conn);
    let out = edge_agent(&["run"], &config);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("another application"), "{}", stderr(&out));
}

#[test]
fn a_data_folder_the_service_user_cannot_write_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let config = write_config(dir.path(), &data);
    let mut cmd = Command::new(workspace_bin("edge-agent"));
    cmd.arg("run").arg("--config").arg(&config);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root writes anywhere: run the daemon as `nobody`, as a service user without rights
        // on the folder would be. The config must stay readable for it.
        use std::os::unix::fs::PermissionsExt;
        for p in [dir.path(), config.as_path()] {
            let mut perm = std::fs::metadata(p).unwrap().permissions();
            perm.set_mode(perm.mode() | 0o005);
            std::fs::set_permissions(p, perm).unwrap();
        }
        cmd.uid(65534).gid(65534);
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(73), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&data.display().to_string()) && stderr(&out).contains("ermission denied"),
        "{}",
        stderr(&out)
    );
    assert_no_panic(&out);
}

#[test]
fn storectl_names_bad_arguments_and_missing_ledgers() {
    let dir = tempfile::tempdir().unwrap();
    let storectl = |args: &[&str]| {
        Command::new(workspace_bin("storectl")).arg("--data-dir").arg(dir.path()).args(args).output().unwrap()
    };

    let out = storectl(&["stock", "show", "A"]);
    assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
    assert!(stderr(&out).contains("no ledger file here"), "{}", stderr(&out));

    // Create an empty ledger, then ask with bad input.
    let config = write_config(dir.path(), dir.path());
    let mut cmd = Command::new(workspace_bin("edge-agent"));
    cmd.arg("run").arg("--config").arg(&config);
    let mut run = Running::spawn(cmd, true);
    run.wait_for("edge-agent ready", Duration::from_secs(30));
    signal(&run.child, SIGTERM);
    run.child.wait().unwrap();

    let out = storectl(&["stock", "show", "--gtin", "4006381333932"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("check digit is 2, expected 1"), "{}", stderr(&out));
    let out = storectl(&["price", "show", "no/such sku"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("invalid SKU"), "{}", stderr(&out));
    let out = storectl(&["--json", "stock", "show", "A"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["on_hand"], 0);
    let out = storectl(&["price", "show", "A"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no price in effect"));
}
