//! Where a simulated device's bytes go: the master side of a pty (the hub opens the slave
//! through a symlink, as it would open `/dev/serial/by-id/...`), or a real serial port.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

pub struct Port {
    stream: Option<SerialStream>,
    /// The symlink the hub opens, for a pty.
    link: Option<PathBuf>,
}

impl Port {
    /// A new pty whose slave is reachable at `link` (replacing whatever was there): "plugging
    /// the device in".
    pub fn pty(link: &Path) -> io::Result<Port> {
        let (master, slave) = SerialStream::pair().map_err(io::Error::other)?;
        let slave_path = slave.name().ok_or_else(|| io::Error::other("pty slave has no name"))?;
        drop(slave);
        if let Some(dir) = link.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(slave_path, link)?;
        Ok(Port { stream: Some(master), link: Some(link.to_owned()) })
    }

    /// A real serial port (a technician's USB adapter wired to the hub).
    pub fn open(path: &Path, baud: u32) -> io::Result<Port> {
        let stream = tokio_serial::new(path.to_string_lossy(), baud).open_native_async().map_err(io::Error::other)?;
        Ok(Port { stream: Some(stream), link: None })
    }

    /// Pulls the plug: the hub's reads fail and the by-id link disappears.
    pub fn unplug(&mut self) {
        self.stream = None;
        if let Some(link) = &self.link {
            let _ = std::fs::remove_file(link);
        }
    }

    /// Plugs a pty device back in at the same link (a new pty node, as after a USB re-enumeration).
    pub fn replug(&mut self) -> io::Result<()> {
        // Take the link out first: dropping the old port must not remove the new symlink.
        let link = self.link.take().ok_or_else(|| io::Error::other("only a pty device can be replugged"))?;
        self.stream = None;
        *self = Port::pty(&link)?;
        Ok(())
    }

    fn stream(&mut self) -> io::Result<&mut SerialStream> {
        self.stream.as_mut().ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "device is unplugged"))
    }

    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let s = self.stream()?;
        s.write_all(bytes).await?;
        s.flush().await
    }

    /// Reads what is there within `timeout`; an empty vector if nothing came.
    pub async fn read(&mut self, timeout: Duration) -> io::Result<Vec<u8>> {
        let s = self.stream()?;
        let mut buf = vec![0u8; 1024];
        match tokio::time::timeout(timeout, s.read(&mut buf)).await {
            Ok(Ok(n)) => {
                buf.truncate(n);
                Ok(buf)
            }
            // EIO on a pty master: the hub has the slave closed right now.
            Ok(Err(e)) if e.raw_os_error() == Some(5) => Ok(Vec::new()),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(Vec::new()),
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            let _ = std::fs::remove_file(link);
        }
    }
}
