//! The daemons as systemd runs them, as far as a machine without systemd running can show it:
//! the unit files in `systemd/` pass `systemd-analyze verify` against the built binaries, and
//! each daemon speaks the notify protocol to a socket the test holds the way systemd would:
//! READY only once it serves (never when it fails to start), watchdog pings at half
//! `WATCHDOG_USEC` (none when `WATCHDOG_PID` names another process), STOPPING on SIGTERM, then
//! a clean exit. SIGHUP changes the edge-agent's log level without a restart; a bad file is
//! named and leaves the level as it was.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e_tests::store::StoreFixture;
use e2e_tests::{signal, tool, workspace_bin, Running, SIGTERM, SIGUSR1};

const WAIT: Duration = Duration::from_secs(30);
/// What the tests give as `WATCHDOG_USEC`: pings are due every 200 ms.
const WATCHDOG_USEC: u64 = 400_000;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace holds tests/").to_owned()
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze") else { return };
    let dir = tempfile::tempdir().unwrap();
    for name in ["edge-agent", "cloud-sync"] {
        let unit = format!("{name}.service");
        let text = std::fs::read_to_string(repo_root().join("systemd").join(&unit)).unwrap();
        // verify checks that ExecStart's binary exists: point it at the one just built.
        let installed = format!("/usr/local/bin/{name}");
        assert!(text.contains(&format!("ExecStart={installed} ")), "{unit}: ExecStart must run {installed}");
        let built = workspace_bin(name);
        let path = dir.path().join(&unit);
        std::fs::write(&path, text.replace(&installed, built.to_str().unwrap())).unwrap();

        let out = Command::new(&analyze).arg("verify").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // verify also reports on units this one names (targets); only ours must be clean.
        let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains(&unit)).collect();
        assert!(
            out.status.success() && about_unit.is_empty(),
            "systemd-analyze verify {unit}: {}\n{stderr}",
            out.status
        );
    }
}

#[test]
fn unit_timeouts_and_folders_match_the_daemons() {
    let edge = std::fs::read_to_string(repo_root().join("systemd/edge-agent.service")).unwrap();
    let default = edge_agent::config::Config::parse(edge_agent::config::DEFAULT_CONFIG, Path::new("default.toml"))
        .expect("the default config parses");
    // Shutdown waits up to shutdown_timeout_ms for the tasks, then as long for the writer.
    let stop = seconds(&edge, "TimeoutStopSec");
    assert!(
        stop * 1000 > 2 * default.ledger.shutdown_timeout_ms,
        "TimeoutStopSec={stop}s must exceed twice ledger.shutdown_timeout_ms ({} ms)",
        default.ledger.shutdown_timeout_ms
    );
    assert_eq!(default.ledger.data_dir, Path::new("/var/lib/edge-agent"), "the default data_dir is the StateDirectory");
    for directive in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "StateDirectory=edge-agent",
        "RuntimeDirectory=edge-agent",
        "ConfigurationDirectory=edge-agent",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(edge.lines().any(|l| l == directive), "edge-agent.service lacks {directive}");
    }
    let cloud = std::fs::read_to_string(repo_root().join("systemd/cloud-sync.service")).unwrap();
    // cloud-sync finishes requests in flight for 10 s after SIGTERM, then exits by itself.
    assert!(seconds(&cloud, "TimeoutStopSec") > 10);
    for directive in ["Type=notify", "NotifyAccess=main", "WatchdogSec=30s", "StateDirectory=cloud-sync"] {
        assert!(cloud.lines().any(|l| l == directive), "cloud-sync.service lacks {directive}");
    }
}

/// The value of `key=Ns` in a unit.
fn seconds(unit: &str, key: &str) -> u64 {
    let value = unit
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in the unit"));
    value.strip_suffix('s').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{key}={value}: expected seconds"))
}

/// The socket systemd would listen on: the daemon under test sends its notifications here. A
/// thread reads them as they come, as systemd does (a datagram socket's queue is short, and a
/// daemon whose notifications are not read blocks sending them).
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    messages: mpsc::Receiver<String>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends when the test drops the receiver (or the socket fails).
            while let Ok(n) = socket.recv(&mut buf) {
                if tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                    break;
                }
            }
        });
        NotifySocket { _dir: dir, path, messages }
    }

    /// The next notification, or none within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.messages.recv_timeout(timeout).ok()
    }

    /// Notifications up to and including the first with a line equal to `line`.
    fn wait_for(&self, line: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(message) = self.recv(left) else { break };
            let hit = has_line(&message, line);
            seen.push(message);
            if hit {
                return seen;
            }
        }
        panic!("no notification with {line:?} within {timeout:?}; got {seen:?}");
    }

    /// Every notification that arrives until `quiet` passes without one.
    fn drain(&self, quiet: Duration) -> Vec<String> {
        std::iter::from_fn(|| self.recv(quiet)).collect()
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// A daemon started with systemd's variables pointing at `notify`, killed if the test fails.
struct Supervised {
    run: Running,
}

impl Supervised {
    fn start(program: &str, args: &[&str], config: &Path, notify: &NotifySocket, stderr: bool) -> Supervised {
        Supervised::start_with(program, args, config, notify, stderr, |_| {})
    }

    fn start_with(
        program: &str,
        args: &[&str],
        config: &Path,
        notify: &NotifySocket,
        stderr: bool,
        more: impl FnOnce(&mut Command),
    ) -> Supervised {
        let mut cmd = Command::new(workspace_bin(program));
        cmd.args(args)
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
            // The test runner's own supervision and log settings are not the daemon's.
            .env_remove("WATCHDOG_PID")
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM");
        more(&mut cmd);
        Supervised { run: Running::spawn(cmd, stderr) }
    }

    fn signal(&self, sig: i32) {
        signal(&self.run.child, sig);
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.run.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running {within:?} later");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.run.child.try_wait().ok().flatten().is_none() {
            let _ = self.run.child.kill();
            let _ = self.run.child.wait();
        }
    }
}

/// After READY: watchdog pings, several and never faster than every half `WATCHDOG_USEC`. They
/// are counted over a window that starts once what queued up before it was read (a test thread
/// that woke late would otherwise find pings sent before it started counting).
fn assert_watchdog_pings(notify: &NotifySocket) {
    let period = Duration::from_micros(WATCHDOG_USEC / 2);
    let early = notify.recv(WAIT).expect("a watchdog ping after READY");
    assert!(has_line(&early, "WATCHDOG=1"), "unexpected notification {early:?}");
    while let Some(queued) = notify.recv(Duration::ZERO) {
        assert!(has_line(&queued, "WATCHDOG=1"), "unexpected notification {queued:?}");
    }
    let window = 10 * period;
    let started = Instant::now();
    let mut pings = 0u32;
    while let Some(left) = window.checked_sub(started.elapsed()) {
        let Some(message) = notify.recv(left) else { break };
        assert!(has_line(&message, "WATCHDOG=1"), "unexpected notification {message:?}");
        pings += 1;
    }
    // A slow machine pings less often, never more: at most one per period, plus one at each end.
    let elapsed = started.elapsed();
    assert!(pings >= 4, "only {pings} watchdog pings in {elapsed:?}");
    let allowed = elapsed.as_micros() / period.as_micros() + 2;
    assert!(u128::from(pings) <= allowed, "{pings} pings in {elapsed:?}: the loop pings too often");
}

/// SIGTERM: STOPPING=1, no ping after it, exit 0.
fn assert_stops_cleanly(daemon: &mut Supervised, notify: &NotifySocket) {
    daemon.signal(SIGTERM);
    notify.wait_for("STOPPING=1", WAIT);
    let status = daemon.wait_exit(WAIT);
    assert!(status.success(), "exit status {status}");
    let after = notify.drain(Duration::from_millis(100));
    assert!(after.iter().all(|m| !has_line(m, "WATCHDOG=1")), "pings after STOPPING=1: {after:?}");
}

#[test]
fn edge_agent_notifies_ready_pings_the_watchdog_and_stops() {
    let store = StoreFixture::new(&[]);
    let notify = NotifySocket::bind();
    let mut daemon = Supervised::start("edge-agent", &["run"], &store.config, &notify, true);

    let first = notify.recv(WAIT).expect("a notification once the daemon is ready");
    assert!(has_line(&first, "READY=1"), "the first notification must be READY=1, got {first:?}");
    assert!(has_line(&first, "STATUS=Serving store s1: 0 lanes, 0 serial devices, MQTT off, cloud none"), "{first:?}");
    // The daemon logs that it is ready before it says so.
    daemon.run.wait_for("edge-agent ready", Duration::from_secs(5));
    assert_watchdog_pings(&notify);
    assert_stops_cleanly(&mut daemon, &notify);
    daemon.run.wait_for("edge-agent stopped cleanly", Duration::from_secs(5));
}

#[test]
fn edge_agent_never_says_ready_when_it_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("ledger.db"), vec![0x5a; 8192]).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[ledger]\ndata_dir = \"{}\"\n", data.display()),
    )
    .unwrap();
    let notify = NotifySocket::bind();
    let mut daemon = Supervised::start("edge-agent", &["run"], &config, &notify, true);
    let status = daemon.wait_exit(WAIT);
    assert_eq!(status.code(), Some(65), "a file that is not a ledger");
    let sent = notify.drain(Duration::from_millis(100));
    assert!(sent.iter().all(|m| !has_line(m, "READY=1")), "READY=1 from a daemon that never started: {sent:?}");
}

#[test]
fn a_watchdog_for_another_process_is_not_pinged() {
    let store = StoreFixture::new(&[]);
    let notify = NotifySocket::bind();
    let mut daemon = Supervised::start_with("edge-agent", &["run"], &store.config, &notify, true, |cmd| {
        cmd.env("WATCHDOG_PID", "1");
    });
    notify.wait_for("READY=1", WAIT);
    // Pings would be due every 200 ms; in 1 s none may come.
    let sent = notify.drain(Duration::from_secs(1));
    assert!(sent.is_empty(), "notifications for a watchdog that is not ours: {sent:?}");
    assert_stops_cleanly(&mut daemon, &notify);
}

/// A cloud-sync config on a SQLite file in `dir`, listening on `listen`.
fn cloud_config(dir: &Path, listen: &str) -> PathBuf {
    let path = dir.join("cloud.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"{listen}\"\n[storage]\nbackend = \"sqlite\"\npath = \"{}\"\n",
            dir.join("cloud.db").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn cloud_sync_notifies_ready_once_listening_pings_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let config = cloud_config(dir.path(), "127.0.0.1:0");
    let notify = NotifySocket::bind();
    // stdout: the "listening on" line.
    let mut cloud = Supervised::start("cloud-sync", &["serve"], &config, &notify, false);

    let first = notify.recv(WAIT).expect("a notification once the service listens");
    assert!(has_line(&first, "READY=1"), "the first notification must be READY=1, got {first:?}");
    // "listening on" was printed before READY, and the address answers at once.
    let seen = cloud.run.wait_for("listening on ", Duration::from_secs(5));
    let addr = seen.last().unwrap().rsplit("listening on ").next().unwrap().trim().to_owned();
    assert!(has_line(&first, &format!("STATUS=Serving on {addr} (Sqlite storage)")), "{first:?}");
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: cloud\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    assert_watchdog_pings(&notify);
    assert_stops_cleanly(&mut cloud, &notify);
}

#[test]
fn cloud_sync_never_says_ready_when_it_cannot_listen() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = cloud_config(dir.path(), &taken.local_addr().unwrap().to_string());
    let notify = NotifySocket::bind();
    let mut cloud = Supervised::start("cloud-sync", &["serve"], &config, &notify, false);
    let status = cloud.wait_exit(WAIT);
    assert_eq!(status.code(), Some(69), "the address is in use");
    let sent = notify.drain(Duration::from_millis(100));
    assert!(sent.iter().all(|m| !has_line(m, "READY=1")), "READY=1 from a service that never listened: {sent:?}");
}

#[test]
fn sighup_changes_the_log_level_and_a_bad_file_keeps_it() {
    let store = StoreFixture::new(&[]);
    let text = std::fs::read_to_string(&store.config).unwrap();
    let fixture_level = "level = \"info,edge_agent=debug\"";
    assert!(text.contains(fixture_level), "the fixture's config changed: {text}");
    let with_level = |level: &str| text.replace(fixture_level, &format!("level = \"{level}\""));
    std::fs::write(&store.config, with_level("warn")).unwrap();

    let notify = NotifySocket::bind();
    let mut daemon = Supervised::start("edge-agent", &["run"], &store.config, &notify, true);
    // At warn the log says nothing when all is well: READY says the daemon is up.
    notify.wait_for("READY=1", WAIT);

    std::fs::write(&store.config, with_level("debug")).unwrap();
    daemon.signal(libc::SIGHUP);
    let before = daemon.run.wait_for("Log level now debug", WAIT);
    // Everything before the reload was logged at warn: neither the info lines of the start nor
    // the debug line about the SIGHUP itself.
    for quiet in ["edge-agent starting", "edge-agent ready", "Signal received"] {
        assert!(before.iter().all(|l| !l.contains(quiet)), "{quiet:?} logged at level warn:\n{}", before.join("\n"));
    }
    // A debug line from the daemon's signal loop now shows.
    daemon.signal(SIGUSR1);
    let line = daemon.run.wait_for("Signal received", WAIT).pop().unwrap();
    assert!(line.contains("DEBUG") && line.contains("SIGUSR1"), "{line}");

    // A bad file is named, key and all, and the level stays debug.
    std::fs::write(&store.config, with_level("edge_agent=loud")).unwrap();
    daemon.signal(libc::SIGHUP);
    let line = daemon.run.wait_for("Reload refused", WAIT).pop().unwrap();
    assert!(line.contains("key `log.level`") && line.contains("config.toml"), "{line}");
    daemon.signal(SIGUSR1);
    let line = daemon.run.wait_for("Signal received", WAIT).pop().unwrap();
    assert!(line.contains("DEBUG") && line.contains("SIGUSR1"), "{line}");

    // Quieter again: the change is still said (at warn, since info no longer shows).
    std::fs::write(&store.config, with_level("warn")).unwrap();
    daemon.signal(libc::SIGHUP);
    let line = daemon.run.wait_for("Log level now warn", WAIT).pop().unwrap();
    assert!(line.contains("WARN"), "{line}");

    assert_stops_cleanly(&mut daemon, &notify);
}
