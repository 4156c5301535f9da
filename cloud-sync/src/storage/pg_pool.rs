//! A small fixed pool of PostgreSQL connections, so many concurrent requests share a bounded
//! number of server sessions (each a process on the server) and a transaction keeps its
//! connection to itself. Connections are opened lazily and replaced when the server drops them.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, NoTls};

use super::StorageError;

pub(crate) struct Pool {
    conninfo: String,
    idle: Mutex<Vec<Client>>,
    /// One permit per connection the pool may hold; a request without one waits its turn.
    permits: Arc<Semaphore>,
}

impl Pool {
    pub fn new(conninfo: &str, size: usize) -> Pool {
        Pool { conninfo: conninfo.to_owned(), idle: Mutex::new(Vec::new()), permits: Arc::new(Semaphore::new(size)) }
    }

    /// A connection for one request: an idle one, or a new one while under the pool size.
    pub async fn get(self: &Arc<Self>) -> Result<Pooled, StorageError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StorageError::Task("the PostgreSQL pool is closed".into()))?;
        let client = match self.take_idle() {
            Some(client) => client,
            None => connect(&self.conninfo).await?,
        };
        Ok(Pooled { client: Some(client), pool: self.clone(), _permit: permit })
    }

    fn take_idle(&self) -> Option<Client> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // A connection the server closed (restart, idle timeout) is dropped, not handed out.
        while let Some(client) = idle.pop() {
            if !client.is_closed() {
                return Some(client);
            }
        }
        None
    }
}

async fn connect(conninfo: &str) -> Result<Client, StorageError> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "PostgreSQL connection lost; the pool opens a new one on next use");
        }
    });
    Ok(client)
}

/// A checked-out connection; it returns to the pool when dropped. A transaction dropped
/// unfinished (a cancelled request) has already queued its ROLLBACK on the connection, which
/// runs before anything the next user sends.
pub(crate) struct Pooled {
    client: Option<Client>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(client) = self.client.take().filter(|c| !c.is_closed()) {
            self.pool.idle.lock().unwrap_or_else(|e| e.into_inner()).push(client);
        }
    }
}
