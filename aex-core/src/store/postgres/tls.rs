//! TLS to the server with rustls, as the dispatcher uses it: what each `sslmode` checks (see
//! [`super::settings`]).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::settings::{Check, Roots, Tls};
use crate::error::{Error, Result};

/// The connector for `tls` (never used with [`Tls::Off`], where the driver does not ask).
///
/// # Errors
/// [`Error::InvalidRequest`] on field `sslrootcert` when the trusted certificates cannot be
/// read: a missing or unreadable file, or one with no certificate in it;
/// [`Error::Unavailable`] when the system's cannot.
pub(super) fn connector(tls: &Tls) -> Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match tls {
        Tls::Off | Tls::On { check: Check::Nothing, .. } => Arc::new(Unchecked(provider.clone())),
        Tls::On { check: Check::Chain(roots), .. } => Arc::new(AnyName(checked(roots, &provider)?)),
        Tls::On { check: Check::ChainAndName(roots), .. } => checked(roots, &provider)?,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Unavailable(format!("cannot set up TLS for PostgreSQL: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A verifier of certificate chains up to `roots`, and of the host name.
fn checked(roots: &Roots, provider: &Arc<CryptoProvider>) -> Result<Arc<dyn ServerCertVerifier>> {
    match roots {
        Roots::System => Ok(Arc::new(
            rustls_platform_verifier::Verifier::new(provider.clone())
                .map_err(|e| Error::Unavailable(format!("cannot read the system's trusted certificates: {e}")))?,
        )),
        Roots::File(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| Error::invalid("sslrootcert", format!("cannot read '{shown}': {e}")))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::invalid("sslrootcert", format!("'{shown}' is not a PEM file of certificates: {e}")))?;
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::invalid("sslrootcert", format!("'{shown}' holds no usable certificate")));
            }
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .map(|v| v as Arc<dyn ServerCertVerifier>)
                .map_err(|e| Error::Unavailable(format!("cannot use sslrootcert '{shown}': {e}")))
        }
    }
}

/// `allow` / `prefer` / `require` with no trusted certificates at hand: encrypted, the certificate
/// not checked (libpq's meaning of those modes; the handshake's signatures still are).
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (and `allow` / `prefer` / `require` given trusted certificates): the chain checked,
/// the host name not.
#[derive(Debug)]
struct AnyName(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
