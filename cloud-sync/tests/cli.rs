//! The `cloud-sync` binary as an operator runs it: configuration checks and their exit codes,
//! credentials printed once, migrations, and `serve` on a port the OS chooses, answering
//! `/healthz` and leaving cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloud-sync");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("JOURNAL_STREAM").env_remove("RUST_LOG").output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A configuration for a SQLite database in `dir`, listening on an OS-chosen loopback port.
fn config_in(dir: &Path) -> PathBuf {
    let path = dir.join("cloud-sync.toml");
    let db = dir.join("cloud.db");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nbackend = \"sqlite\"\npath = {:?}\n",
            db.to_str().unwrap()
        ),
    )
    .unwrap();
    path
}

#[test]
fn check_config_names_the_offending_key_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[storage]\nbackend = \"sqlite\"\npath = \"/tmp/x.db\"\n[sync]\npage_rowz = 10\n").unwrap();
    let out = run(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("sync.page_rowz"), "{}", stderr(&out));

    std::fs::write(&bad, "[storage]\nbackend = \"sqlite\"\npath = \"/tmp/x.db\"\n[sync]\npage_rows = 0\n").unwrap();
    let out = run(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("sync.page_rows"), "{}", stderr(&out));

    let out = run(&["check-config", "--config", dir.path().join("missing.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let out = run(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(64), "usage errors are 64 too");
}

#[test]
fn the_default_config_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["print-default-config"]);
    assert!(out.status.success());
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let out = run(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("configuration is valid"));
}

#[test]
fn credentials_are_printed_once_and_never_twice() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let config = config.to_str().unwrap();
    let out = run(&["migrate", "--config", config]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["migrate", "--config", config]);
    assert!(out.status.success(), "migrating twice is harmless: {}", stderr(&out));

    let out = run(&["store", "add", "s1", "--config", config]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out);
    let token = token.trim_end();
    assert_eq!(token.len(), 64, "{token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(stderr(&out).contains("s1"));

    let again = run(&["store", "add", "s1", "--config", config]);
    assert_eq!(again.status.code(), Some(65), "{}", stderr(&again));
    assert!(stderr(&again).contains("already exists"), "{}", stderr(&again));
    assert_eq!(stdout(&again), "", "no second token");

    let bad_id = run(&["store", "add", "s 1", "--config", config]);
    assert_eq!(bad_id.status.code(), Some(64), "{}", stderr(&bad_id));

    let admin = run(&["admin", "add", "hq-ops", "--config", config]);
    assert!(admin.status.success(), "{}", stderr(&admin));
    assert_eq!(stdout(&admin).trim_end().len(), 64);
    assert_ne!(stdout(&admin).trim_end(), token);
    let again = run(&["admin", "add", "hq-ops", "--config", config]);
    assert_eq!(again.status.code(), Some(65), "{}", stderr(&again));

    // The database file holds hashes, never the tokens.
    let db = std::fs::read(dir.path().join("cloud.db")).unwrap();
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()));
}

#[test]
fn an_unreachable_database_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud-sync.toml");
    std::fs::write(&path, "[storage]\nbackend = \"sqlite\"\npath = \"/nonexistent-dir/sub/cloud.db\"\n").unwrap();
    let out = run(&["migrate", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(stderr(&out).contains("/nonexistent-dir/sub/cloud.db"), "{}", stderr(&out));
}

/// `GET /healthz` with a minimal HTTP/1.1 client.
fn healthz(addr: SocketAddr) -> String {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    raw
}

/// Kills the child if a test fails before it exits by itself.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn serve_answers_healthz_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let child = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Guard(child);
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let line = lines.next().expect("serve printed nothing").unwrap();
    let addr: SocketAddr = line.strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).parse().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    let reply = healthz(addr);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("ok"), "{reply}");

    let pid = libc::pid_t::try_from(child.0.id()).unwrap();
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}
