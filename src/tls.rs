//! TLS for the listener (PROTOCOL.md Transport): the configured certificate
//! and key, or a self-signed pair made once in `state_dir` and reused; ALPN
//! `tollgate/1`; optional client certificates checked against a CA.

use crate::config::Config;
use crate::wire::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names of the self-signed pair under `state_dir/tls/`.
pub const SELF_SIGNED_CERT: &str = "tls/self-signed.crt";
/// See [`SELF_SIGNED_CERT`].
pub const SELF_SIGNED_KEY: &str = "tls/self-signed.key";

/// A TLS setup that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// Making the self-signed pair failed.
    #[error("making a self-signed certificate: {0}")]
    Generate(String),
}

/// The server's TLS configuration and its certificate's fingerprint.
pub struct ServerTls {
    /// For tokio-rustls.
    pub config: Arc<ServerConfig>,
    /// `sha256:<hex>` of the end-entity certificate, for `--pin`.
    pub fingerprint: String,
    /// Whether the pair was generated here.
    pub self_signed: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// `sha256:<hex>` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.into(),
        what: e.to_string(),
    })
}

/// Makes (once) or reuses the self-signed pair in `state_dir`.
fn self_signed(state_dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = state_dir.join(SELF_SIGNED_CERT);
    let key = state_dir.join(SELF_SIGNED_KEY);
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    let dir = cert.parent().expect("the pair lives in a directory");
    crate::storage::create_private_dirs(dir).map_err(io(dir))?;
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let pair =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    write_private(&key, pair.signing_key.serialize_pem().as_bytes()).map_err(io(&key))?;
    write_private(&cert, pair.cert.pem().as_bytes()).map_err(io(&cert))?;
    Ok((cert, key))
}

/// Writes a file readable by its owner only, durably (temp, fsync, rename).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::storage::write_durably(path, data, 0o600)
}

/// The daemon's certificate and key files, and whether they are the
/// self-signed pair (made on first use).
fn pair_paths(cfg: &Config) -> Result<(PathBuf, PathBuf, bool), TlsError> {
    Ok(match (&cfg.server.tls.cert, &cfg.server.tls.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone(), false),
        _ => {
            let (c, k) = self_signed(&cfg.server.state_dir)?;
            (c, k, true)
        }
    })
}

/// The fingerprint clients pin (`sha256:<hex>`), read from the daemon's
/// certificate file.
pub fn server_fingerprint(cfg: &Config) -> Result<String, TlsError> {
    let (cert, _, _) = pair_paths(cfg)?;
    Ok(fingerprint(&read_certs(&cert)?[0]))
}

/// TLS for the web console (`[server.web]`): its own pair when given, else
/// the daemon's; HTTP/1.1, no client certificates.
pub fn web_tls(cfg: &Config) -> Result<Arc<ServerConfig>, TlsError> {
    let web = cfg.server.web.as_ref();
    let (cert, key) = match web.and_then(|w| w.cert.clone().zip(w.key.clone())) {
        Some(pair) => pair,
        None => {
            let (c, k, _) = pair_paths(cfg)?;
            (c, k)
        }
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(read_certs(&cert)?, read_key(&key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Builds the server's TLS configuration from the config.
pub fn server_tls(cfg: &Config) -> Result<ServerTls, TlsError> {
    let (cert_path, key_path, self_signed) = pair_paths(cfg)?;
    let certs = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    let fingerprint = fingerprint(&certs[0]);
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &cfg.server.tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c)?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let v = if cfg.server.tls.require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                v.build().map_err(|e| TlsError::Generate(e.to_string()))?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        fingerprint,
        self_signed,
    })
}

/// A client verifier that accepts exactly one server certificate, by its
/// The server's certificate is not the pinned one (`--pin`); its `Display`
/// is what the client prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the server's certificate does not match the pin: the server presents {server}, --pin is {pinned}; if the server's certificate was replaced, pin the new fingerprint (the daemon prints it at start)"
)]
pub struct PinMismatch {
    /// The certificate the server presented.
    pub server: String,
    /// The pin.
    pub pinned: String,
}

/// SHA-256 (`--pin`); signatures are still checked.
#[derive(Debug)]
pub struct PinVerifier {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinVerifier {
    /// Pins `sha256:<hex>`.
    pub fn new(pin: &str) -> PinVerifier {
        PinVerifier {
            pin: pin.to_ascii_lowercase(),
            provider: provider(),
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pin {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    server: fingerprint(end_entity),
                    pinned: self.pin.clone(),
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client TLS configuration: pinned (`--pin`) or verified against a CA
/// file (`--ca`). Offers ALPN `tollgate/1`.
pub fn client_config(
    pin: Option<&str>,
    ca: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let mut config = match (pin, ca) {
        (Some(p), _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier::new(p)))
            .with_no_client_auth(),
        (None, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, None) => {
            return Err(TlsError::Pem {
                path: PathBuf::from("--pin/--ca"),
                what: "give --pin sha256:<hex> (printed by the daemon at start) or --ca FILE"
                    .into(),
            });
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The subject CN and DNS SANs of a certificate (PROTOCOL.md: with mutual
/// TLS, one of them must equal HELLO's `client_id`). Empty if unparsable.
pub fn peer_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .map(str::to_string)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    names
}
