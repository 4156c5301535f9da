//! The device registry's file: `devices.db` in the data folder, a small SQLite database apart
//! from the ledger, so that after a restart the hub knows its devices before they speak again
//! (shown offline until heard) and quarantined strangers stay quarantined. It is a cache: the
//! ledger never depends on it. A file that is corrupt, not ours, or of a newer schema is moved
//! aside to `devices.db.corrupt` with one journal line and the hub starts with an empty
//! registry. Written by one thread only ([`spawn_writer`]), which the registry's owner (the
//! MQTT router) feeds with batches of changed entries; `synchronous=NORMAL` (a power cut may
//! lose the last batch, which the devices' next messages restore).

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags};
use shared::DeviceId;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::registry::{Changes, DeviceInfo};
use crate::mqtt::topics::DeviceKind;

/// The file's name in the data folder.
pub const FILE: &str = "devices.db";
/// `PRAGMA application_id` of the registry file ("SEDV"), so another file is never taken for it.
const APPLICATION_ID: i32 = 0x5345_4456;
const SCHEMA_VERSION: i32 = 1;
/// Batches waiting for the writer; the router keeps its changes for later when it is full.
pub const WRITE_QUEUE: usize = 4;

const SCHEMA: &str = "
CREATE TABLE devices (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    firmware TEXT,
    boot_id INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    missed_heartbeats INTEGER NOT NULL,
    battery_pct INTEGER,
    rssi_dbm INTEGER
) STRICT;
CREATE TABLE quarantined (
    id TEXT PRIMARY KEY NOT NULL,
    messages INTEGER NOT NULL
) STRICT;
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file is there but unusable: damaged, another application's, or a newer schema.
    #[error("{path}: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
}

/// What the file held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub devices: Vec<(DeviceId, DeviceInfo)>,
    pub quarantined: Vec<(DeviceId, u64)>,
    /// Rows that could not be read back (an id or kind this build refuses), skipped.
    pub skipped: usize,
}

pub struct RegistryStore {
    conn: Connection,
    path: PathBuf,
}

impl RegistryStore {
    /// Opens (or creates) the registry file in `data_dir` and reads it. A corrupt or foreign
    /// file is moved aside and replaced by an empty one (logged, `REGISTRY_CORRUPT`); any
    /// other error (the folder is not writable) is returned, and the caller runs without one.
    pub fn open(data_dir: &Path) -> Result<(RegistryStore, Loaded), StoreError> {
        let path = data_dir.join(FILE);
        match Self::open_path(&path) {
            Ok(opened) => Ok(opened),
            Err(StoreError::Unusable { reason, .. }) => {
                let aside = data_dir.join(format!("{FILE}.corrupt"));
                tracing::error!(path = %path.display(), moved_to = %aside.display(), reason = %reason, error_code = "REGISTRY_CORRUPT",
                    "The device registry file is unusable; moved aside, starting with an empty registry (devices reappear as they speak; the ledger is not affected)");
                std::fs::rename(&path, &aside).map_err(|e| StoreError::Unusable {
                    path: path.clone(),
                    reason: format!("cannot move it aside to {}: {e}", aside.display()),
                })?;
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(data_dir.join(format!("{FILE}{suffix}")));
                }
                Self::open_path(&path)
            }
            Err(e) => Err(e),
        }
    }

    fn open_path(path: &Path) -> Result<(RegistryStore, Loaded), StoreError> {
        let sqlite = |source| StoreError::Sqlite { path: path.to_owned(), source };
        let unusable = |reason: String| StoreError::Unusable { path: path.to_owned(), reason };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite)?;
        // The first statement that reads the file tells a damaged one from a good one.
        let header = conn
            .query_row("SELECT (SELECT application_id FROM pragma_application_id), (SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM sqlite_schema)", [], |r| {
                Ok((r.get::<_, i32>(0)?, r.get::<_, i32>(1)?, r.get::<_, i64>(2)?))
            })
            .map_err(|e| classify(e, path))?;
        match header {
            (0, 0, 0) => {
                conn.execute_batch(&format!(
                    "PRAGMA journal_mode = WAL; BEGIN; {SCHEMA} PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .map_err(sqlite)?;
            }
            (APPLICATION_ID, SCHEMA_VERSION, _) => {}
            (APPLICATION_ID, v, _) => {
                return Err(unusable(format!("schema version {v}, this build reads {SCHEMA_VERSION}")))
            }
            (id, _, _) => return Err(unusable(format!("not a device registry (application_id 0x{id:08x})"))),
        }
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;").map_err(|e| classify(e, path))?;
        let loaded = load(&conn).map_err(|e| classify(e, path))?;
        Ok((RegistryStore { conn, path: path.to_owned() }, loaded))
    }

    /// Reads the registry file of `data_dir` without changing anything (storectl with the daemon
    /// down): `None` when there is none. A damaged or foreign file is an error naming it (only
    /// the daemon moves such a file aside).
    pub fn read(data_dir: &Path) -> Result<Option<Loaded>, StoreError> {
        let path = data_dir.join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        let conn = crate::read_only::open(&path).map_err(|e| classify(e, &path))?;
        let header = conn
            .query_row("SELECT (SELECT application_id FROM pragma_application_id), (SELECT user_version FROM pragma_user_version)", [], |r| {
                Ok((r.get::<_, i32>(0)?, r.get::<_, i32>(1)?))
            })
            .map_err(|e| classify(e, &path))?;
        let unusable = |reason: String| StoreError::Unusable { path: path.clone(), reason };
        match header {
            (APPLICATION_ID, SCHEMA_VERSION) => {}
            // An empty file (created, never written): nothing saved yet, as the daemon sees it.
            (0, 0) if empty_schema(&conn).map_err(|e| classify(e, &path))? => return Ok(None),
            (APPLICATION_ID, v) => {
                return Err(unusable(format!("schema version {v}, this build reads {SCHEMA_VERSION}")))
            }
            (id, _) => return Err(unusable(format!("not a device registry (application_id 0x{id:08x})"))),
        }
        load(&conn).map(Some).map_err(|e| classify(e, &path))
    }

    /// Writes one batch of changed entries in one transaction (a quarantined entry with 0
    /// messages is deleted).
    pub fn save(&mut self, changes: &Changes) -> Result<(), StoreError> {
        let sqlite = |source| StoreError::Sqlite { path: self.path.clone(), source };
        let tx = self.conn.transaction().map_err(sqlite)?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO devices (id, kind, firmware, boot_id, last_seq, last_seen_ms, missed_heartbeats, battery_pct, rssi_dbm)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, firmware = excluded.firmware,
                       boot_id = excluded.boot_id, last_seq = excluded.last_seq, last_seen_ms = excluded.last_seen_ms,
                       missed_heartbeats = excluded.missed_heartbeats, battery_pct = excluded.battery_pct,
                       rssi_dbm = excluded.rssi_dbm",
                )
                .map_err(sqlite)?;
            for (id, d) in &changes.devices {
                put.execute(params![
                    id.as_str(),
                    d.kind,
                    d.firmware,
                    d.boot_id,
                    d.last_seq,
                    clamp(d.last_seen_ms),
                    clamp(d.missed_heartbeats),
                    d.battery_pct,
                    d.rssi_dbm
                ])
                .map_err(sqlite)?;
            }
            let mut quarantine = tx
                .prepare_cached(
                    "INSERT INTO quarantined (id, messages) VALUES (?1, ?2)
                     ON CONFLICT (id) DO UPDATE SET messages = excluded.messages",
                )
                .map_err(sqlite)?;
            let mut release = tx.prepare_cached("DELETE FROM quarantined WHERE id = ?1").map_err(sqlite)?;
            for (id, n) in &changes.quarantined {
                if *n == 0 {
                    release.execute([id.as_str()]).map_err(sqlite)?;
                } else {
                    quarantine.execute(params![id.as_str(), clamp(*n)]).map_err(sqlite)?;
                }
            }
        }
        tx.commit().map_err(sqlite)
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// SQLite's "this is not a (sound) database" codes mean the file is unusable; others (I/O,
/// permissions, a full disk) are reported as they are.
/// Whether the database holds no schema at all (a file created but never set up).
fn empty_schema(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get::<_, i64>(0)).map(|n| n == 0)
}

fn classify(e: rusqlite::Error, path: &Path) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    match e.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => StoreError::Unusable { path: path.to_owned(), reason: e.to_string() },
        _ => StoreError::Sqlite { path: path.to_owned(), source: e },
    }
}

fn load(conn: &Connection) -> Result<Loaded, rusqlite::Error> {
    let mut loaded = Loaded::default();
    let mut rows = conn.prepare(
        "SELECT id, kind, firmware, boot_id, last_seq, last_seen_ms, missed_heartbeats, battery_pct, rssi_dbm FROM devices",
    )?;
    let mut rows = rows.query([])?;
    while let Some(r) = rows.next()? {
        let id: String = r.get(0)?;
        let kind: String = r.get(1)?;
        let (Ok(id), Some(kind)) = (DeviceId::new(&id), DeviceKind::from_name(&kind)) else {
            loaded.skipped += 1;
            continue;
        };
        let info = DeviceInfo {
            kind: kind.as_str(),
            firmware: r.get(2)?,
            boot_id: r.get(3)?,
            last_seq: r.get(4)?,
            last_seen_ms: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
            online: false,
            missed_heartbeats: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
            battery_pct: r.get(7)?,
            rssi_dbm: r.get(8)?,
        };
        loaded.devices.push((id, info));
    }
    let mut rows = conn.prepare("SELECT id, messages FROM quarantined")?;
    let mut rows = rows.query([])?;
    while let Some(r) = rows.next()? {
        let id: String = r.get(0)?;
        match DeviceId::new(&id) {
            Ok(id) => loaded.quarantined.push((id, u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0))),
            Err(_) => loaded.skipped += 1,
        }
    }
    Ok(loaded)
}

/// Runs the writer on a blocking thread of the daemon's tracker: it writes each batch as it
/// comes and ends when the sender (the router) is gone, after the last batch.
pub fn spawn_writer(mut store: RegistryStore, tasks: &TaskTracker) -> mpsc::Sender<Changes> {
    let (tx, mut rx) = mpsc::channel::<Changes>(WRITE_QUEUE);
    tasks.spawn_blocking(move || {
        let mut failing = false;
        while let Some(changes) = rx.blocking_recv() {
            match store.save(&changes) {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(path = %store.path.display(), "Device registry saved again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, error_code = "REGISTRY_WRITE",
                        "Cannot save the device registry; it is kept in memory (a restart shows devices as they speak again)");
                }
                Err(_) => {}
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: &'static str) -> DeviceInfo {
        DeviceInfo {
            kind,
            firmware: Some("2.4.1".into()),
            boot_id: 7,
            last_seq: 42,
            last_seen_ms: 1_700_000_000_000,
            online: true,
            missed_heartbeats: 3,
            battery_pct: Some(80),
            rssi_dbm: Some(-61),
        }
    }

    #[test]
    fn entries_survive_a_reopen_offline_and_released_strangers_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, loaded) = RegistryStore::open(dir.path()).unwrap();
        assert!(loaded.devices.is_empty() && loaded.quarantined.is_empty());
        let esl = DeviceId::new("esl-1").unwrap();
        let stranger = DeviceId::new("esl-666").unwrap();
        let changes = Changes { devices: vec![(esl.clone(), info("esl"))], quarantined: vec![(stranger.clone(), 5)] };
        store.save(&changes).unwrap();
        let mut updated = info("esl");
        updated.battery_pct = Some(79);
        store.save(&Changes { devices: vec![(esl.clone(), updated.clone())], quarantined: vec![] }).unwrap();
        drop(store);

        let (mut store, loaded) = RegistryStore::open(dir.path()).unwrap();
        updated.online = false;
        assert_eq!(loaded.devices, vec![(esl, updated)]);
        assert_eq!(loaded.quarantined, vec![(stranger.clone(), 5)]);
        store.save(&Changes { devices: vec![], quarantined: vec![(stranger, 0)] }).unwrap();
        drop(store);
        assert!(RegistryStore::open(dir.path()).unwrap().1.quarantined.is_empty());
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_moved_aside_and_the_registry_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), vec![0x5a; 8192]).unwrap();
        let (mut store, loaded) = RegistryStore::open(dir.path()).unwrap();
        assert!(loaded.devices.is_empty());
        assert_eq!(std::fs::read(dir.path().join(format!("{FILE}.corrupt"))).unwrap(), vec![0x5a; 8192]);
        store
            .save(&Changes { devices: vec![(DeviceId::new("rfid-1").unwrap(), info("rfid"))], quarantined: vec![] })
            .unwrap();
        drop(store);
        assert_eq!(RegistryStore::open(dir.path()).unwrap().1.devices.len(), 1, "the new file works");

        let other = tempfile::tempdir().unwrap();
        let conn = Connection::open(other.path().join(FILE)).unwrap();
        conn.execute_batch("PRAGMA application_id = 1; CREATE TABLE t (x);").unwrap();
        drop(conn);
        let (_, loaded) = RegistryStore::open(other.path()).unwrap();
        assert!(loaded.devices.is_empty());
        assert!(other.path().join(format!("{FILE}.corrupt")).exists(), "another application's file is kept aside");
    }

    #[test]
    fn reading_changes_nothing_and_names_a_file_it_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RegistryStore::read(dir.path()).unwrap().is_none(), "no file yet");
        let (mut store, _) = RegistryStore::open(dir.path()).unwrap();
        let esl = DeviceId::new("esl-1").unwrap();
        store.save(&Changes { devices: vec![(esl.clone(), info("esl"))], quarantined: vec![] }).unwrap();
        let saved = RegistryStore::read(dir.path()).unwrap().unwrap();
        assert_eq!(saved.devices.iter().map(|(id, _)| id).collect::<Vec<_>>(), [&esl], "read beside the writer");
        drop(store);
        assert_eq!(RegistryStore::read(dir.path()).unwrap().unwrap().devices.len(), 1);

        std::fs::write(dir.path().join(FILE), vec![0x5a; 8192]).unwrap();
        let e = RegistryStore::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains(FILE), "{e}");
        assert_eq!(std::fs::read(dir.path().join(FILE)).unwrap(), vec![0x5a; 8192], "left where it is");
        assert!(!dir.path().join(format!("{FILE}.corrupt")).exists());

        // An empty file (created, never set up) holds nothing yet; another application's
        // database is still refused.
        std::fs::write(dir.path().join(FILE), b"").unwrap();
        assert!(RegistryStore::read(dir.path()).unwrap().is_none());
        std::fs::remove_file(dir.path().join(FILE)).unwrap();
        Connection::open(dir.path().join(FILE)).unwrap().execute_batch("CREATE TABLE other (x)").unwrap();
        let e = RegistryStore::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a device registry"), "{e}");
    }
}
