//! Identities of both sides: a key pair and a self-signed certificate. The
//! server makes one at `mirror-server init`, a client at `ublk-mirror
//! enroll`. Each side pins the other's certificate by its fingerprint (the
//! server's travels in the enrollment token; the client's is recorded at
//! enrollment), so no certificate authority is involved.
//!
//! Files, in the identity's directory: `key.pem` (PKCS#8, mode 0600) and
//! `cert.pem`.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};

use crate::{Error, Result};

/// Name in every certificate (peers check the fingerprint, not the name).
pub const CERT_NAME: &str = "ublk-mirror";

/// SHA-256 of a certificate's DER bytes: what a client pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", crate::hex::encode(&self.0))
    }
}

/// A key and its self-signed certificate.
#[derive(Debug)]
pub struct Identity {
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("key.pem"), dir.join("cert.pem"))
}

impl Identity {
    /// Make a new identity in `dir` (created); refuses to replace one.
    pub fn create(dir: &Path) -> Result<Identity> {
        let (key_path, cert_path) = paths(dir);
        if key_path.exists() || cert_path.exists() {
            return Err(Error::Identity(format!(
                "{} already holds an identity; its peer has pinned it, so it is never replaced",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let key = rcgen::KeyPair::generate()
            .map_err(|e| Error::Identity(format!("generating a key: {e}")))?;
        let params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()])
            .map_err(|e| Error::Identity(format!("certificate parameters: {e}")))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::Identity(format!("signing the certificate: {e}")))?;
        let write = |path: &Path, mode: u32, text: &str| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| {
                    f.write_all(text.as_bytes())?;
                    f.sync_all()
                })
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))
        };
        write(&key_path, 0o600, &key.serialize_pem())?;
        write(&cert_path, 0o644, &cert.pem())?;
        Ok(Identity {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// Load the identity in `dir`.
    pub fn load(dir: &Path) -> Result<Identity> {
        let (key_path, cert_path) = paths(dir);
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|e| {
                Error::io(
                    format!(
                        "reading {} (run `mirror-server init` first)",
                        path.display()
                    ),
                    e,
                )
            })
        };
        let key = rcgen::KeyPair::from_pem(&read(&key_path)?)
            .map_err(|e| Error::Identity(format!("{}: {e}", key_path.display())))?;
        let cert = CertificateDer::from_pem_file(&cert_path)
            .map_err(|e| Error::Identity(format!("{}: {e}", cert_path.display())))?;
        Ok(Identity {
            cert_der: cert.to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// What clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert_der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_and_loads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let made = Identity::create(dir.path()).unwrap();
        let loaded = Identity::load(dir.path()).unwrap();
        assert_eq!(made.cert_der, loaded.cert_der);
        assert_eq!(made.fingerprint(), loaded.fingerprint());
        assert!(made.fingerprint().to_string().starts_with("sha256:"));
        assert_eq!(made.fingerprint().to_string().len(), 7 + 64);
        let err = Identity::create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("never replaced"), "{err}");
        let mode = std::fs::metadata(dir.path().join("key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
