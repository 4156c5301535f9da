//! A loopback HTTP/1.1 proxy between a store and the cloud that fails on command: the link is
//! down, the cloud answers 500, answers slowly, or its answer is cut short. One request per
//! connection (the proxy asks the cloud to close after answering), which is all a sync client
//! needs and keeps the proxy simple enough to trust.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward faithfully.
    None,
    /// Accept and close at once: the store's link (or the cloud) is down.
    Down,
    /// Answer 500 without asking the cloud.
    Status500,
    /// Forward after this delay (the store's timeout decides what that means).
    Slow(Duration),
    /// Forward, then pass on only the first half of the cloud's answer and close.
    Truncate,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProxyCounts {
    pub forwarded: u64,
    pub faulted: u64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    counts: Arc<Mutex<ProxyCounts>>,
    task: tokio::task::JoinHandle<()>,
}

/// Largest request head accepted (the sync client's is a few hundred bytes).
const MAX_HEAD: usize = 64 * 1024;

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(Mutex::new(Fault::None));
        let counts = Arc::new(Mutex::new(ProxyCounts::default()));
        let (f, c) = (fault.clone(), counts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (f, c) = (f.clone(), c.clone());
                tokio::spawn(async move {
                    let _ = serve(client, upstream, f, c).await;
                });
            }
        });
        FaultProxy { addr, fault, counts, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    pub fn counts(&self) -> ProxyCounts {
        *self.counts.lock().unwrap()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    counts: Arc<Mutex<ProxyCounts>>,
) -> std::io::Result<()> {
    let current = *fault.lock().unwrap();
    if current == Fault::Down {
        counts.lock().unwrap().faulted += 1;
        return Ok(());
    }
    let request = read_request(&mut client).await?;
    match current {
        Fault::Status500 => {
            counts.lock().unwrap().faulted += 1;
            let body = "injected fault: internal server error";
            let head = format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            client.write_all(head.as_bytes()).await?;
            client.write_all(body.as_bytes()).await?;
            return client.shutdown().await;
        }
        Fault::Slow(delay) => {
            counts.lock().unwrap().faulted += 1;
            tokio::time::sleep(delay).await;
        }
        _ => {}
    }
    let mut cloud = TcpStream::connect(upstream).await?;
    cloud.write_all(&request).await?;
    let mut answer = Vec::new();
    cloud.read_to_end(&mut answer).await?;
    if current == Fault::Truncate {
        counts.lock().unwrap().faulted += 1;
        client.write_all(&answer[..answer.len() / 2]).await?;
    } else {
        counts.lock().unwrap().forwarded += 1;
        client.write_all(&answer).await?;
    }
    client.shutdown().await
}

/// Reads one request (head and `content-length` body) and returns it with `connection: close`
/// so the cloud ends the answer by closing.
async fn read_request(client: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut length = 0usize;
    let mut lines: Vec<&str> = Vec::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().map_err(|_| std::io::Error::other("bad content-length"))?;
        }
        if !lower.starts_with("connection:") {
            lines.push(line);
        }
    }
    while buf.len() < head_end + length {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut out = lines.join("\r\n").into_bytes();
    out.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    out.extend_from_slice(&buf[head_end..head_end + length]);
    Ok(out)
}
