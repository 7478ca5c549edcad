//! Where the chunk store lives: the `[store]` section of `server.toml`,
//! and opening it as an `object_store` — a local directory or an
//! S3-compatible bucket.
//!
//! ```toml
//! [store]
//! url = "store"                      # a directory (relative: in the data
//!                                    # directory), file:///ABS, or
//!                                    # s3://BUCKET/PREFIX
//! # endpoint = "https://s3.example.net"   # S3 only; else AWS or $AWS_ENDPOINT
//! # region = "us-east-1"             # else $AWS_REGION / $AWS_DEFAULT_REGION
//! # path_style = true                # bucket in the path, not the host name
//! # credentials_file = "/etc/mirror-server/s3.credentials"
//! #                                  # else AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
//! # pack_size = "32MiB"              # target size of a pack of chunks
//! # gc_every = "1d"                  # garbage collection by the running server
//! # gc_window = "1445m"              # a dead object waits this long (24h5m)
//! # verify_every = "7d"              # re-read and re-hash every chunk
//! # chunk_cache = "256MiB"           # memory for chunks read lately
//! ```
//!
//! A credentials file is in the AWS shared-credentials shape (only the
//! keys are read; a `[default]` header is allowed) and must not be
//! readable by group or others:
//!
//! ```text
//! aws_access_key_id = AKIA…
//! aws_secret_access_key = …
//! # aws_session_token = …
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use serde::{Deserialize, Serialize};
use ublk_mirror_common::size::ByteSize;
use ublk_mirror_common::Span;

use crate::error::{Error, Result};

/// The default target size of a pack.
pub const DEFAULT_PACK: u64 = 32 << 20;

/// The default size of the in-memory cache of chunks read.
pub const DEFAULT_CHUNK_CACHE: u64 = 256 << 20;

/// The `[store]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// A directory, `file:///ABS`, or `s3://BUCKET/PREFIX`.
    pub url: String,
    /// The S3 endpoint (default: AWS, or `$AWS_ENDPOINT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The S3 region (default: `$AWS_REGION`, else us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Path-style requests (`ENDPOINT/BUCKET/KEY`), as most self-hosted
    /// stores want.
    #[serde(default = "yes")]
    pub path_style: bool,
    /// Where the S3 keys are (default: the `AWS_*` environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Target size of a pack.
    #[serde(default = "default_pack")]
    pub pack_size: ByteSize,
    /// How often the running server collects garbage ("0s": never; then
    /// `mirror-server gc`).
    #[serde(default = "default_gc_every")]
    pub gc_every: Span,
    /// How long a dead object stays condemned before it is deleted: longer
    /// than any publication takes (see `chunks::gc`).
    #[serde(default = "default_gc_window")]
    pub gc_window: Span,
    /// How often the running server re-reads and re-hashes every chunk
    /// its volumes need ("0s": never; then `mirror-server verify`).
    #[serde(default = "default_verify_every")]
    pub verify_every: Span,
    /// Memory for chunks read from the store lately (exports and restores
    /// of stored versions read each chunk once; "0B": none).
    #[serde(default = "default_chunk_cache")]
    pub chunk_cache: ByteSize,
}

fn default_chunk_cache() -> ByteSize {
    ByteSize(DEFAULT_CHUNK_CACHE)
}

fn default_verify_every() -> Span {
    Span(Duration::from_secs(7 * 24 * 3600))
}

fn default_gc_every() -> Span {
    Span(Duration::from_secs(24 * 3600))
}

fn default_gc_window() -> Span {
    Span(super::gc::DEFAULT_WINDOW)
}

fn yes() -> bool {
    true
}

fn default_pack() -> ByteSize {
    ByteSize(DEFAULT_PACK)
}

impl StoreConfig {
    /// The embedded default: a directory `store` in the data directory.
    pub fn local_default() -> StoreConfig {
        StoreConfig {
            url: "store".into(),
            endpoint: None,
            region: None,
            path_style: true,
            credentials_file: None,
            pack_size: default_pack(),
            gc_every: default_gc_every(),
            gc_window: default_gc_window(),
            verify_every: default_verify_every(),
            chunk_cache: default_chunk_cache(),
        }
    }
}

/// Where a configured store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory.
    Dir(PathBuf),
    /// A bucket, and a prefix in it ("" for none).
    S3 {
        /// The bucket.
        bucket: String,
        /// Key prefix, without slashes at either end.
        prefix: String,
    },
}

/// Where `url` points; relative directories are in `data`.
pub fn location(url: &str, data: &Path) -> Result<Location> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Invalid(format!(
                "[store] url {url:?}: name a bucket, as s3://BUCKET/PREFIX"
            )));
        }
        return Ok(Location::S3 {
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
        });
    }
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(Error::Invalid(format!(
                "[store] url {url:?}: a file:// url takes an absolute path (file:///var/lib/...)"
            )));
        }
        return Ok(Location::Dir(PathBuf::from(path)));
    }
    if url.contains("://") {
        return Err(Error::Invalid(format!(
            "[store] url {url:?}: the store is a directory, file:///PATH or s3://BUCKET/PREFIX"
        )));
    }
    if url.is_empty() {
        return Err(Error::Invalid("[store] url is empty".into()));
    }
    Ok(Location::Dir(data.join(url)))
}

/// Open the store `config` names (nothing is read or written yet), and a
/// description of it for messages.
pub fn open(config: &StoreConfig, data: &Path) -> Result<(Arc<dyn ObjectStore>, String)> {
    match location(&config.url, data)? {
        Location::Dir(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating the store {}", dir.display()), e))?;
            let store = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| Error::Store(format!("opening the store {}: {e}", dir.display())))?
                .with_fsync(true);
            Ok((Arc::new(store), dir.display().to_string()))
        }
        Location::S3 { bucket, prefix } => {
            // reqwest is built without a TLS provider of its own: ours is
            // ring, as for QUIC (a second install is a harmless no-op).
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(&bucket)
                .with_virtual_hosted_style_request(!config.path_style)
                .with_retry(RetryConfig {
                    backoff: BackoffConfig::default(),
                    max_retries: 4,
                    retry_timeout: Duration::from_secs(30),
                });
            if let Some(endpoint) = &config.endpoint {
                b = b
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            if let Some(region) = &config.region {
                b = b.with_region(region);
            } else if std::env::var_os("AWS_REGION").is_none()
                && std::env::var_os("AWS_DEFAULT_REGION").is_none()
            {
                b = b.with_region("us-east-1");
            }
            if let Some(file) = &config.credentials_file {
                let c = read_credentials(file)?;
                b = b
                    .with_access_key_id(c.key_id)
                    .with_secret_access_key(c.secret);
                if let Some(token) = c.token {
                    b = b.with_token(token);
                }
            }
            let s3 = b
                .build()
                .map_err(|e| Error::Invalid(format!("[store] s3://{bucket}: {e}")))?;
            let describe = format!("s3://{bucket}/{prefix}");
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix.as_str()))
            };
            Ok((store, describe))
        }
    }
}

/// Keys from a credentials file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// aws_access_key_id.
    pub key_id: String,
    /// aws_secret_access_key.
    pub secret: String,
    /// aws_session_token, if any.
    pub token: Option<String>,
}

/// Read a credentials file (see the module docs), refusing one others can
/// read or its group write (group read is how root's file is given to
/// the server's user: `install -m 640 -g mirror-server`).
pub fn read_credentials(path: &Path) -> Result<Credentials> {
    let what = || format!("[store] credentials_file {}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| Error::io(what(), e))?;
    if meta.permissions().mode() & 0o037 != 0 {
        return Err(Error::Invalid(format!(
            "{}: others can read it or its group write it (chmod 600 it, or 640 with the server's group)",
            what()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(what(), e))?;
    parse_credentials(&text).map_err(|why| Error::Invalid(format!("{}: {why}", what())))
}

fn parse_credentials(text: &str) -> std::result::Result<Credentials, String> {
    let (mut key_id, mut secret, mut token) = (None, None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            if line != "[default]" {
                return Err(format!("line {}: only a [default] profile is read", n + 1));
            }
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {}: expected KEY = VALUE", n + 1));
        };
        let v = v.trim().to_string();
        match k.trim() {
            "aws_access_key_id" => key_id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            other => return Err(format!("line {}: unknown key {other:?}", n + 1)),
        }
    }
    Ok(Credentials {
        key_id: key_id.ok_or("no aws_access_key_id")?,
        secret: secret.ok_or("no aws_secret_access_key")?,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_directory_or_a_bucket() {
        let data = Path::new("/d");
        assert_eq!(
            location("store", data).unwrap(),
            Location::Dir("/d/store".into())
        );
        assert_eq!(
            location("file:///x/y", data).unwrap(),
            Location::Dir("/x/y".into())
        );
        assert_eq!(
            location("s3://b/p/q/", data).unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(
            location("s3://b", data).unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        for bad in ["", "s3://", "file://rel", "gs://b/p"] {
            assert!(location(bad, data).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_credentials_file_reads_and_others_are_refused() {
        let c = parse_credentials("[default]\naws_access_key_id = K\naws_secret_access_key=S\n")
            .unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.secret.as_str(), c.token),
            ("K", "S", None)
        );
        assert!(parse_credentials("aws_access_key_id = K\n").is_err());
        assert!(parse_credentials("[other]\n").is_err());
        assert!(parse_credentials("region = x\n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cred");
        std::fs::write(&p, "aws_access_key_id=K\naws_secret_access_key=S\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_credentials(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert!(read_credentials(&p).is_err(), "its group may write it");
        for mode in [0o600, 0o640, 0o400] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_credentials(&p).unwrap().key_id, "K", "{mode:o}");
        }
    }
}
