//! TLS 1.3 over QUIC with mutually pinned certificates.
//!
//! Neither side trusts a certificate authority. The client accepts exactly
//! the server certificate whose fingerprint it pinned (from the enrollment
//! token). The server asks every client for a certificate and checks that
//! the client holds its key (the TLS handshake signature); *which* client
//! it is, and what it may do, is decided after the handshake from the
//! certificate's fingerprint ([`peer_fingerprint`]): an enrolled one gets
//! its volumes, an unknown one may only enroll.
//!
//! A server's QUIC endpoint also takes its stateless-reset and
//! connection-ID keys from its identity ([`endpoint`]), so that its clients
//! learn at once that a restarted server lost their connections.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Fingerprint, Identity, CERT_NAME};
use crate::{Error, Result};

/// The ALPN protocol name: peers that do not speak it fail the handshake.
pub const ALPN: &[u8] = b"ublk-mirror/1";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what}: {e}"))
}

fn key_of(identity: &Identity) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()))
}

/// The QUIC server config: `identity` as the server, a certificate asked
/// of every client.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig> {
    let provider = provider();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS versions", e))?
        .with_client_cert_verifier(Arc::new(AnyClientKey { provider }))
        .with_single_cert(
            vec![CertificateDer::from(identity.cert_der.clone())],
            key_of(identity),
        )
        .map_err(|e| tls_error("server certificate", e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| tls_error("QUIC server crypto", e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport()?);
    Ok(config)
}

/// The QUIC client config: `identity` as the client, trusting only the
/// server certificate with fingerprint `server`.
pub fn client_config(identity: &Identity, server: Fingerprint) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS versions", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer {
            fingerprint: server,
            provider,
        }))
        .with_client_auth_cert(
            vec![CertificateDer::from(identity.cert_der.clone())],
            key_of(identity),
        )
        .map_err(|e| tls_error("client certificate", e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| tls_error("QUIC client crypto", e))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport()?);
    Ok(config)
}

/// Requests (streams) a peer may have open at once.
pub const MAX_STREAMS: u32 = 8;

/// How often an idle link says it is alive.
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);

/// Silence after which a link is dead: four keep-alives missed. A client
/// then reconnects (to another server, when it knows several) and resumes;
/// a server drops the connection and keeps its stagings for the client's
/// return.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The socket buffers a QUIC endpoint asks for (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max` unless the process may force them):
/// the default 208 KiB receive buffer overflows when a sync streams at
/// loopback or LAN speed (on loopback, about one datagram in a hundred),
/// and each datagram dropped there is a loss that QUIC sends again and
/// that shrinks its sending window.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// A QUIC endpoint on `socket`, with [`SOCKET_BUFFER`]s. `server`: a
/// server's configuration and the identity it serves as, whose key the
/// endpoint's stateless resets are derived from (see `reset_keys`); none for
/// a client, whose endpoint lives as long as its one connection.
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<(quinn::ServerConfig, &Identity)>,
) -> std::io::Result<quinn::Endpoint> {
    use nix::sys::socket::sockopt;
    grow(&socket, sockopt::RcvBuf, sockopt::RcvBufForce);
    grow(&socket, sockopt::SndBuf, sockopt::SndBufForce);
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    let (config, server) = match server {
        Some((server, identity)) => {
            let (reset, ids) = reset_keys(identity);
            let mut config = quinn::EndpointConfig::new(Arc::new(reset));
            config.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(ids))
            });
            (config, Some(server))
        }
        None => (quinn::EndpointConfig::default(), None),
    };
    quinn::Endpoint::new(config, server, socket, runtime)
}

/// The keys a server's stateless resets are made with (and the one its
/// connection IDs are signed with, by which it tells its own from garbage
/// that deserves no reset): derived from its identity's private key, so
/// that a server restarted on the same address (after a crash, an
/// upgrade, `systemctl restart`) still knows the connection IDs of its
/// previous run and answers their packets with a reset the clients accept
/// (RFC 9000, 10.3). They then reconnect and resume at once, where with
/// keys drawn anew for each run (quinn's default) the new run dropped
/// their packets and they waited out [`IDLE_TIMEOUT`] (20 s) first. The
/// reset key is as secret as the key it comes from; a reset forged
/// without it is ignored.
fn reset_keys(identity: &Identity) -> (ring::hmac::Key, u64) {
    use sha2::Digest as _;
    let derive = |what: &[u8]| {
        sha2::Sha256::new()
            .chain_update(b"ublk-mirror server endpoint, v1: ")
            .chain_update(what)
            .chain_update(b"\0")
            .chain_update(&identity.key_der)
            .finalize()
    };
    let reset = derive(b"stateless reset key");
    let ids = derive(b"connection ID key");
    let ids = u64::from_le_bytes(ids[..8].try_into().expect("a sha256 has 8 bytes"));
    (ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset), ids)
}

/// Ask for a [`SOCKET_BUFFER`] with `opt`, best effort (a smaller buffer
/// only costs speed); past the kernel's cap, force it with `force` where
/// the process may (CAP_NET_ADMIN: the device daemon runs as root).
fn grow<O, F>(socket: &std::net::UdpSocket, opt: O, force: F)
where
    O: nix::sys::socket::SetSockOpt<Val = usize> + nix::sys::socket::GetSockOpt<Val = usize> + Copy,
    F: nix::sys::socket::SetSockOpt<Val = usize>,
{
    use nix::sys::socket::{getsockopt, setsockopt};
    let _ = setsockopt(socket, opt, &SOCKET_BUFFER);
    if getsockopt(socket, opt).is_ok_and(|n| n < SOCKET_BUFFER) {
        let _ = setsockopt(socket, force, &SOCKET_BUFFER);
    }
}

/// Transport settings of both sides: keep-alives so that an idle link
/// stays up (a device with nothing to ship sends nothing), an idle timeout
/// that notices a dead one, and few concurrent streams.
fn transport() -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .map_err(|e| tls_error("idle timeout", e))?,
    ));
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    Ok(Arc::new(t))
}

/// The server name clients connect to (the certificate's; only the
/// fingerprint is checked).
pub const SERVER_NAME: &str = CERT_NAME;

/// The fingerprint of the certificate the peer presented.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| Fingerprint::of(c))
}

/// Both sides speak TLS 1.3 only.
fn tls12_refused() -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// The peer's handshake signature, made with its certificate's key: the
/// proof that it holds the key.
fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
    verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Accepts exactly one server certificate.
#[derive(Debug)]
struct PinnedServer {
    fingerprint: Fingerprint,
    provider: Arc<CryptoProvider>,
}

/// A server whose certificate is not the pinned one: its name in a failed
/// connection's error (rustls shows it in its debug form) is how that is
/// told apart from a network fault.
#[derive(Debug)]
struct NotPinned;

/// How a certificate that is not the pinned one shows in a connection's
/// error.
pub const NOT_PINNED: &str = "NotPinned";

impl std::fmt::Display for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server's certificate is not the one this machine enrolled with")
    }
}

impl std::error::Error for NotPinned {}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if Fingerprint::of(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotPinned)),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Asks every client for a certificate and checks it holds the key;
/// who the client is gets decided from the fingerprint afterwards.
#[derive(Debug)]
struct AnyClientKey {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn handshake(
        server_id: &Identity,
        client_id: &Identity,
        pinned: Fingerprint,
    ) -> std::result::Result<Option<Fingerprint>, quinn::ConnectionError> {
        let server = quinn::Endpoint::server(
            server_config(server_id).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await?;
            Ok::<_, quinn::ConnectionError>(peer_fingerprint(&conn))
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config(client_id, pinned).unwrap());
        let connected = client.connect(addr, SERVER_NAME).unwrap().await;
        match connected {
            Ok(_conn) => accept.await.unwrap(),
            Err(e) => {
                accept.abort();
                Err(e)
            }
        }
    }

    #[tokio::test]
    async fn pinned_peers_connect_and_a_wrong_fingerprint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let server = Identity::create(&dir.path().join("server")).unwrap();
        let client = Identity::create(&dir.path().join("client")).unwrap();
        // The server sees the client's fingerprint.
        let seen = handshake(&server, &client, server.fingerprint())
            .await
            .unwrap();
        assert_eq!(seen, Some(client.fingerprint()));
        // A client that pinned another server refuses this one.
        let other = Identity::create(&dir.path().join("other")).unwrap();
        let err = handshake(&server, &client, other.fingerprint())
            .await
            .unwrap_err();
        assert!(
            matches!(err, quinn::ConnectionError::TransportError(_)),
            "{err:?}"
        );
    }

    /// A server that dies without a word (its runtime stops: nothing is
    /// sent) and comes back on the same address with the same identity
    /// resets the connections of its previous run: the client hears a
    /// stateless reset as soon as it sends, instead of waiting out the
    /// idle timeout (a reset made with another key is ignored).
    #[test]
    fn a_server_back_on_its_address_resets_its_previous_runs_connections() {
        let dir = tempfile::tempdir().unwrap();
        let server_id = Identity::create(&dir.path().join("server")).unwrap();
        let client_id = Identity::create(&dir.path().join("client")).unwrap();
        let serve = |rt: &tokio::runtime::Runtime, socket: std::net::UdpSocket| {
            let _entered = rt.enter();
            let server = endpoint(
                socket,
                Some((server_config(&server_id).unwrap(), &server_id)),
            )
            .unwrap();
            // Accepts and holds what comes, until its runtime stops.
            rt.spawn(async move {
                let mut held = Vec::new();
                while let Some(incoming) = server.accept().await {
                    if let Ok(conn) = incoming.await {
                        held.push(conn);
                    }
                }
            });
        };
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
        };
        let first = runtime();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        serve(&first, socket);

        let client_rt = runtime();
        let conn = client_rt.block_on(async {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut client = endpoint(socket, None).unwrap();
            client.set_default_client_config(
                client_config(&client_id, server_id.fingerprint()).unwrap(),
            );
            let conn = client.connect(addr, SERVER_NAME).unwrap().await.unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(b"hello").await.unwrap();
            (client, conn, send)
        });
        // The server dies: its tasks are dropped unpolled, nothing is sent.
        first.shutdown_background();
        let second = runtime();
        let socket = (0..100)
            .find_map(|_| {
                std::net::UdpSocket::bind(addr).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                })
            })
            .expect("the address is free again");
        serve(&second, socket);
        let (_client, conn, mut send) = conn;
        let closed = client_rt.block_on(async move {
            // Sending makes the new run answer.
            let _ = send.write_all(&[0u8; 4096]).await;
            conn.closed().await
        });
        assert!(
            matches!(closed, quinn::ConnectionError::Reset),
            "the connection ended with {closed:?}, not a stateless reset"
        );
    }
}
