//! A barcode scanner in the plain mode scanners ship with: optional AIM prefix, the code, a
//! suffix; re-sends the last code when the hub answers NAK (as real scanners configured for
//! ACK/NAK do).

use std::io;
use std::time::Duration;

use crate::port::Port;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suffix {
    Cr,
    Lf,
    Crlf,
    None,
}

impl Suffix {
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Suffix::Cr => b"\r",
            Suffix::Lf => b"\n",
            Suffix::Crlf => b"\r\n",
            Suffix::None => b"",
        }
    }
}

pub struct PlainScannerSim {
    pub port: Port,
    pub suffix: Suffix,
    /// AIM identifier sent before each code, e.g. `]E0`.
    pub aim: Option<String>,
    last: Vec<u8>,
}

impl PlainScannerSim {
    pub fn new(port: Port, suffix: Suffix, aim: Option<&str>) -> PlainScannerSim {
        PlainScannerSim { port, suffix, aim: aim.map(str::to_owned), last: Vec::new() }
    }

    fn framed(&self, code: &str) -> Vec<u8> {
        let mut bytes = Vec::new();
        if let Some(aim) = &self.aim {
            bytes.extend_from_slice(aim.as_bytes());
        }
        bytes.extend_from_slice(code.as_bytes());
        bytes.extend_from_slice(self.suffix.bytes());
        bytes
    }

    /// One scan. Without a suffix the hub needs a quiet gap before the next one.
    pub async fn scan(&mut self, code: &str) -> io::Result<()> {
        self.last = self.framed(code);
        let bytes = self.last.clone();
        self.port.write(&bytes).await?;
        if self.suffix == Suffix::None {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// The same code twice in quick succession (item held in the beam).
    pub async fn double_scan(&mut self, code: &str) -> io::Result<()> {
        self.scan(code).await?;
        self.scan(code).await
    }

    /// Line noise.
    pub async fn garbage(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.port.write(bytes).await
    }

    /// Reads the hub's answers for `wait`; re-sends the last code for each NAK. Returns the
    /// ACK/NAK bytes seen.
    pub async fn answer_naks(&mut self, wait: Duration) -> io::Result<Vec<u8>> {
        let answers = self.port.read(wait).await?;
        for &b in &answers {
            if b == 0x15 && !self.last.is_empty() {
                let bytes = self.last.clone();
                self.port.write(&bytes).await?;
            }
        }
        Ok(answers)
    }
}
