//! `storectl`'s side of the control socket: one request, one reply, blocking (a CLI needs no
//! runtime), with "the daemon is not running" told apart from a refusal.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{Cmd, ErrorBody, Reply, Request, CONTROL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket: the daemon is stopped (or another path is configured).
    #[error("edge-agent is not running (no answer on {path}: {reason})")]
    NotRunning { path: String, reason: String },
    #[error("{}", .0.message)]
    Refused(ErrorBody),
    /// The socket is there but this user may not use it.
    #[error("no permission to use the control socket {path}: run as a member of its group (see [control] group in the daemon's config) or as the service user")]
    NoPermission { path: String },
    #[error("control socket: {0}")]
    Io(String),
}

/// Sends `cmd` and waits for the reply (at most `timeout`).
pub fn call(socket: &Path, cmd: Cmd, timeout: Duration) -> Result<serde_json::Value, ClientError> {
    let not_running =
        |e: std::io::Error| ClientError::NotRunning { path: socket.display().to_string(), reason: e.to_string() };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::NoPermission { path: socket.display().to_string() },
        _ => not_running(e),
    })?;
    let io = |e: std::io::Error| ClientError::Io(e.to_string());
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line =
        serde_json::to_vec(&Request { v: CONTROL_VERSION, cmd }).map_err(|e| ClientError::Io(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    let reply: Reply = serde_json::from_str(answer.trim_end())
        .map_err(|e| ClientError::Io(format!("unreadable reply from the daemon ({e}): {answer:.200}")))?;
    match (reply.ok, reply.error) {
        (_, Some(error)) => Err(ClientError::Refused(error)),
        (Some(value), None) => Ok(value),
        (None, None) => Err(ClientError::Io("empty reply from the daemon".into())),
    }
}
