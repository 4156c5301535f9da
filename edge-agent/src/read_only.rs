//! Opening the daemon's SQLite files read-only from storectl, including as a user who may read
//! the data folder but not write it (a member of the daemon's group). Reading a WAL database
//! needs its `-shm` index; when the daemon is down and stopped cleanly there is none, and such a
//! user cannot create it ("attempt to write a readonly database"). Then, with no `-wal` content
//! to miss, the file is opened as immutable: read as it stands, no lock, no side file.

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags};

/// Opens `path` read-only and checks it can be read; falls back to an immutable open when a
/// clean WAL database cannot be read without creating its side files.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    match probe(&conn) {
        Ok(()) => Ok(conn),
        Err(e) if cannot_create_side_files(&e) && !has_wal_content(path) => {
            drop(conn);
            open_immutable(path)
        }
        Err(e) => Err(e),
    }
}

/// The first read of a WAL database is where its `-shm` is needed.
fn probe(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
}

fn cannot_create_side_files(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen))
}

fn has_wal_content(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).is_ok_and(|m| m.len() > 0)
}

/// The file as it stands: SQLite takes no lock and writes nothing (safe only while no one
/// writes it, which a cleanly stopped daemon's empty WAL shows).
fn open_immutable(path: &Path) -> rusqlite::Result<Connection> {
    let uri = format!("file:{}?mode=ro&immutable=1", uri_path(path));
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(uri, flags)?;
    probe(&conn)?;
    Ok(conn)
}

/// `path` for a `file:` URI: the characters a URI gives meaning to, percent-encoded.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'%' | b'?' | b'#' | b' ' => out.push_str(&format!("%{b:02X}")),
            b if b.is_ascii() => out.push(char::from(*b)),
            // Non-ASCII bytes (UTF-8 or not) are passed on encoded too.
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_immutable_open_reads_a_clean_wal_database_and_leaves_no_side_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd name #1?.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x); INSERT INTO t VALUES (42);").unwrap();
        drop(conn); // a clean close checkpoints and removes -wal and -shm
        assert!(!has_wal_content(&path));
        let conn = open_immutable(&path).unwrap();
        assert_eq!(conn.query_row("SELECT x FROM t", [], |r| r.get::<_, i64>(0)).unwrap(), 42);
        drop(conn);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["odd name #1?.db"], "nothing created beside it");
        // The ordinary way works too (here the folder is writable).
        let conn = open(&path).unwrap();
        assert_eq!(conn.query_row("SELECT x FROM t", [], |r| r.get::<_, i64>(0)).unwrap(), 42);
    }

    #[test]
    fn reserved_characters_are_encoded() {
        assert_eq!(uri_path(Path::new("/var/lib/a b/c%d?e#f.db")), "/var/lib/a%20b/c%25d%3Fe%23f.db");
        assert_eq!(uri_path(Path::new("/tmp/ä.db")), "/tmp/%C3%A4.db");
    }
}
