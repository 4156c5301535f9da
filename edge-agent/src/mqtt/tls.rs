//! TLS to the store's broker (`mqtts://`): the rustls client configuration, built from the
//! configured PEM files on the build's one crypto provider (ring, DESIGN 12), so that rumqttc
//! never has to pick a provider itself. Every problem with a file names the file and the key
//! that points at it, and is found when the configuration is checked (`check-config`, start).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// A TLS file that cannot be used: which key names it, which file, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct TlsFileError {
    /// The `[mqtt]` key naming the file (`ca_file`, `client_cert_file`, `client_key_file`).
    pub key: &'static str,
    pub file: PathBuf,
    pub message: String,
}

fn read(key: &'static str, file: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(file).map_err(|e| TlsFileError {
        key,
        file: file.to_owned(),
        message: format!("cannot read it: {e}"),
    })
}

fn certificates(key: &'static str, file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let err = |message: String| TlsFileError { key, file: file.to_owned(), message };
    let bytes = read(key, file)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not a valid PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(certs)
}

/// The client configuration trusting the CA certificates in `ca_file`, with `client` (a
/// certificate chain file and its key file) for client authentication when given.
pub fn client_config(ca_file: &Path, client: Option<(&Path, &Path)>) -> Result<Arc<ClientConfig>, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certificates("ca_file", ca_file)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsFileError {
            key: "ca_file",
            file: ca_file.to_owned(),
            message: format!("certificate {} is not a usable CA certificate: {e}", i + 1),
        })?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError { key: "ca_file", file: ca_file.to_owned(), message: e.to_string() })?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let chain = certificates("client_cert_file", cert_file)?;
            let key_err = |message: String| TlsFileError { key: "client_key_file", file: key_file.to_owned(), message };
            let key = PrivateKeyDer::from_pem_slice(&read("client_key_file", key_file)?)
                .map_err(|e| key_err(format!("holds no usable PEM private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| key_err(format!("does not fit the client certificate: {e}")))?
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = client_config(&missing, None).unwrap_err();
        assert_eq!((e.key, e.file.as_path()), ("ca_file", missing.as_path()));
        assert!(e.to_string().contains("missing.pem: cannot read it"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        assert!(client_config(&empty, None).unwrap_err().message.contains("holds no PEM certificate"));

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let e = client_config(&garbage, None).unwrap_err();
        assert!(e.message.contains("certificate 1 is not a usable CA certificate"), "{e}");
    }
}
