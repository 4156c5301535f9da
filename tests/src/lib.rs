//! Harness for the end-to-end tests: where the real binaries are, and how to run them and
//! read what they print while they run.

pub mod cloud;
pub mod demo;
pub mod lane;
pub mod mqtt;
pub mod output;
pub mod proxy;
pub mod store;
pub mod synced;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of a binary of the workspace, built by `cargo test --workspace` next to the test
/// executables (`target/<profile>/`). Cargo builds a package's binaries for the test run only
/// when that package has integration tests of its own: every binary crate here has some.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run the tests with `cargo test --workspace` so every binary is built",
        path.display()
    );
    path
}

/// Whether a test that needs an external tool must fail (CI) rather than skip when it is
/// missing.
pub fn required_tools() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Finds `tool` on PATH; under CI its absence is a failure, elsewhere the caller skips.
pub fn tool(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(tool)).find(|p| p.is_file()));
    if found.is_none() {
        assert!(!required_tools(), "{tool} is required under CI=true but is not installed (.ci/run installs it)");
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// A child process whose output lines arrive on a channel as it prints them.
pub struct Running {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Running {
    /// Spawns `cmd` reading its stdout (or stderr when `stderr` is true) line by line.
    pub fn spawn(mut cmd: Command, stderr: bool) -> Running {
        if stderr {
            cmd.stderr(Stdio::piped()).stdout(Stdio::null());
        } else {
            cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        }
        let mut child = cmd.stdin(Stdio::null()).spawn().expect("spawn");
        let (tx, rx) = mpsc::channel();
        let out: Box<dyn std::io::Read + Send> =
            if stderr { Box::new(child.stderr.take().unwrap()) } else { Box::new(child.stdout.take().unwrap()) };
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines: rx }
    }

    /// Waits for a line containing `needle`, returning every line seen up to it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    seen.push(line);
                    if hit {
                        return seen;
                    }
                }
                Err(_) => panic!("no line containing {needle:?} within {timeout:?}; saw:\n{}", seen.join("\n")),
            }
        }
    }
}

/// Sends a signal to a child.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory is involved.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig}) failed", child.id());
}

pub use libc::{SIGINT, SIGKILL, SIGTERM, SIGUSR1};
