//! The cloud for a test: the real `cloud-sync` binary on a loopback port the OS chose, on a
//! SQLite file of its own or on a fresh PostgreSQL database, with an HQ admin credential and
//! the stores' tokens, and an HQ client for its JSON API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{required_tools, signal, tool, workspace_bin, Running, SIGTERM};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where tests find PostgreSQL (a superuser role, see `.ci/run`).
pub fn pg_admin_conninfo() -> String {
    std::env::var("STORE_EDGE_PG").unwrap_or_else(|_| "host=/var/run/postgresql user=root dbname=postgres".into())
}

/// SQLite always; PostgreSQL when it answers (under `CI=true` it must).
pub fn backends() -> Vec<Backend> {
    let mut out = vec![Backend::Sqlite];
    if tool("psql").is_some() {
        let ok = Command::new("psql")
            .arg(pg_admin_conninfo())
            .args(["-qAtc", "SELECT 1"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            out.push(Backend::Postgres);
        } else {
            assert!(
                !required_tools(),
                "PostgreSQL is required under CI=true but does not answer at {}",
                pg_admin_conninfo()
            );
            eprintln!("SKIPPED: PostgreSQL does not answer at {}", pg_admin_conninfo());
        }
    }
    out
}

/// A database created for one test and dropped after it.
struct PgDatabase {
    name: String,
}

impl PgDatabase {
    fn create() -> PgDatabase {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("se_e2e_{}_{n}", std::process::id());
        psql(&format!("DROP DATABASE IF EXISTS {name}"));
        psql(&format!("CREATE DATABASE {name}"));
        PgDatabase { name }
    }

    fn conninfo(&self) -> String {
        let admin = pg_admin_conninfo();
        let without_db: Vec<&str> = admin.split_whitespace().filter(|kv| !kv.starts_with("dbname=")).collect();
        format!("{} dbname={}", without_db.join(" "), self.name)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(pg_admin_conninfo())
            .args(["-qc", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .output();
    }
}

fn psql(sql: &str) {
    let out = Command::new("psql").arg(pg_admin_conninfo()).args(["-qc", sql]).output().unwrap();
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
}

/// An HTTP client for tests (the workspace builds reqwest without a default TLS provider; the
/// one provider of the build is installed first, as the daemon does).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub struct CloudFixture {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub admin_token: String,
    pub run: Option<Running>,
    pub addr: std::net::SocketAddr,
    pg: Option<PgDatabase>,
}

impl CloudFixture {
    /// Migrates a fresh database, creates the HQ credential and starts serving.
    pub fn start(backend: Backend) -> CloudFixture {
        CloudFixture::start_with(backend, "")
    }

    /// As [`CloudFixture::start`], with `server` appended to the config's `[server]` section
    /// (TOML lines, e.g. `max_body_bytes = 4096\n`).
    pub fn start_with(backend: Backend, server: &str) -> CloudFixture {
        let dir = tempfile::tempdir().unwrap();
        let pg = (backend == Backend::Postgres).then(PgDatabase::create);
        let storage = match &pg {
            None => format!("backend = \"sqlite\"\npath = \"{}\"\n", dir.path().join("cloud.db").display()),
            Some(db) => format!("backend = \"postgres\"\nurl = \"{}\"\n", db.conninfo()),
        };
        let config = dir.path().join("cloud.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n{server}[storage]\n{storage}[log]\nlevel = \"info,cloud_sync=debug\"\n"
            ),
        )
        .unwrap();
        let mut fixture = CloudFixture {
            backend,
            dir,
            config,
            admin_token: String::new(),
            run: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            pg,
        };
        fixture.cli(&["migrate"]);
        fixture.admin_token = fixture.cli(&["admin", "add", "hq"]);
        fixture.serve();
        fixture
    }

    /// Runs a `cloud-sync` subcommand with this config; returns its stdout's last line.
    pub fn cli(&self, args: &[&str]) -> String {
        let out =
            Command::new(workspace_bin("cloud-sync")).args(args).arg("--config").arg(&self.config).output().unwrap();
        assert!(
            out.status.success(),
            "cloud-sync {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_owned()
    }

    /// Registers a store and returns its bearer token.
    pub fn add_store(&self, store: &str) -> String {
        self.cli(&["store", "add", store])
    }

    /// Registers `store`, writes its token to `dir/token` and returns the store's `[cloud]`
    /// config section for `url` (this cloud's, or a proxy's in front of it) with `settings`
    /// (more `[cloud]` keys, one per line).
    pub fn store_section(&self, store: &str, dir: &Path, url: &str, settings: &str) -> String {
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{}\n", self.add_store(store))).unwrap();
        format!("[cloud]\nurl = \"{url}\"\ntoken_file = \"{}\"\n{settings}", token_file.display())
    }

    /// Starts serving (again), on the same port once one was chosen.
    pub fn serve(&mut self) {
        if self.addr.port() != 0 {
            let text = std::fs::read_to_string(&self.config).unwrap();
            let text = text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{}\"", self.addr));
            std::fs::write(&self.config, text).unwrap();
        }
        let mut cmd = Command::new(workspace_bin("cloud-sync"));
        cmd.arg("serve").arg("--config").arg(&self.config);
        let run = Running::spawn(cmd, false);
        let seen = run.wait_for("listening on ", Duration::from_secs(30));
        let line = seen.last().unwrap();
        let addr = line.rsplit("listening on ").next().unwrap().trim();
        self.addr = addr.parse().unwrap_or_else(|_| panic!("cannot parse the address in {line:?}"));
        self.run = Some(run);
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut run) = self.run.take() {
            run.child.kill().unwrap();
            run.child.wait().unwrap();
        }
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut run) = self.run.take() {
            signal(&run.child, SIGTERM);
            let status = run.child.wait().unwrap();
            assert!(status.success(), "cloud-sync exited with {status}");
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The chain-wide stock of `sku` as HQ reads it (`chain_total`).
    pub async fn chain_total(&self, sku: &shared::Sku) -> i64 {
        let (status, answer) = self.hq("GET", &format!("/v1/hq/stock/{sku}"), None).await;
        assert_eq!(status, 200, "{answer}");
        answer["chain_total"].as_i64().unwrap_or_else(|| panic!("no chain_total in {answer}"))
    }

    /// An HQ request with the admin credential: `(status, JSON answer or Null)`.
    pub async fn hq(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.hq_raw(method, path, body.map(|b| ("application/json", b.to_string()))).await
    }

    /// An HQ request with a body of any content type.
    pub async fn hq_raw(&self, method: &str, path: &str, body: Option<(&str, String)>) -> (u16, Value) {
        let mut req = http_client()
            .request(method.parse().unwrap(), format!("{}{path}", self.url()))
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(30));
        if let Some((content_type, text)) = body {
            req = req.header("content-type", content_type).body(text);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())))
    }
}

impl Drop for CloudFixture {
    fn drop(&mut self) {
        self.kill();
        drop(self.pg.take());
    }
}
