//! Certificate mode: the bundle carries an X.509 chain (signing certificate first), which must
//! lead to a CA the operator trusts (`--trust-ca`). Path building and validation are rustls'
//! webpki; certificate fields are read with RustCrypto's `x509-cert`.
//!
//! Unlike the reference verifier, which validates the chain at the signing certificate's own
//! `notBefore` (the bundle has no trusted timestamp), the chain is validated *now*: a model
//! whose signing certificate has expired or is not yet valid is refused, so a leaked key stops
//! working when its certificate runs out.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::{ExtendedKeyUsage, KeyUsage};

use super::bundle::{b64_decode, CertificateChain};
use super::keys::PublicKey;
use super::SigningError;

/// DER content of id-kp-codeSigning (1.3.6.1.5.5.7.3.3), as webpki wants it.
const CODE_SIGNING_EKU: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];
/// Longest chain accepted from a bundle (signing certificate + intermediates + root).
const MAX_CHAIN: usize = 8;
/// Largest CA bundle file read.
const MAX_CA_FILE: u64 = 4 * 1024 * 1024;

/// Certificate authorities trusted to issue model-signing certificates.
#[derive(Debug, Clone, Default)]
pub struct TrustedCas {
    certs: Vec<CertificateDer<'static>>,
}

impl TrustedCas {
    /// Adds every certificate of a PEM file (a CA bundle may hold several).
    pub fn add_pem_file(&mut self, path: &Path) -> Result<usize, SigningError> {
        let certs = read_pem_certificates(path)?;
        for der in &certs {
            let cert = CertificateDer::from(der.as_slice());
            // Fail when the trust is loaded, not at the first verification.
            webpki::anchor_from_trusted_cert(&cert).map_err(|e| {
                SigningError::Certificate(format!(
                    "{}: unusable CA certificate: {e}",
                    path.display()
                ))
            })?;
        }
        let n = certs.len();
        self.certs
            .extend(certs.into_iter().map(CertificateDer::from));
        Ok(n)
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// Who signed, as established by a verified certificate chain.
#[derive(Debug, Clone)]
pub struct CertificateSigner {
    pub subject: String,
    pub issuer: String,
    /// SHA-256 of the signing certificate's DER.
    pub fingerprint: String,
    pub key: PublicKey,
}

/// Validates the bundle's chain against `cas` at the current time and returns the signing
/// certificate's identity and key. The signature itself is checked by the caller.
pub fn verify_chain(
    chain: &CertificateChain,
    cas: &TrustedCas,
) -> Result<CertificateSigner, SigningError> {
    if cas.is_empty() {
        return Err(SigningError::NoTrustFor("certificate", "--trust-ca CA.pem"));
    }
    if chain.certificates.is_empty() || chain.certificates.len() > MAX_CHAIN {
        return Err(SigningError::Certificate(format!(
            "the bundle's certificate chain has {} certificates (1 to {MAX_CHAIN} expected)",
            chain.certificates.len()
        )));
    }
    let ders: Vec<CertificateDer<'static>> = chain
        .certificates
        .iter()
        .map(|c| b64_decode(&c.raw_bytes).map(CertificateDer::from))
        .collect::<Result<_, _>>()
        .map_err(|_| SigningError::Base64("certificate chain"))?;
    let (leaf_der, intermediates) = ders.split_first().expect("chain length checked above");

    let anchors = cas
        .certs
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SigningError::Certificate(format!("unusable CA certificate: {e}")))?;
    let leaf = webpki::EndEntityCert::try_from(leaf_der).map_err(|e| {
        SigningError::Certificate(format!("the signing certificate does not parse: {e}"))
    })?;
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::required_if_present(CODE_SIGNING_EKU),
        None,
        None,
    )
    .map_err(chain_error)?;

    let cert = x509_cert::Certificate::from_der(leaf_der).map_err(|e| {
        SigningError::Certificate(format!("the signing certificate does not parse: {e}"))
    })?;
    check_usable_for_signing(&cert)?;
    Ok(CertificateSigner {
        subject: cert.tbs_certificate.subject.to_string(),
        issuer: cert.tbs_certificate.issuer.to_string(),
        fingerprint: hex::encode(Sha256::digest(leaf_der.as_ref())),
        key: public_key_of(leaf_der)?,
    })
}

/// The public key a (DER) certificate certifies.
pub fn public_key_of(der: &[u8]) -> Result<PublicKey, SigningError> {
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|e| SigningError::Certificate(format!("the certificate does not parse: {e}")))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| SigningError::Certificate(e.to_string()))?;
    PublicKey::from_spki_der(&spki)
}

/// Reads the certificates of a PEM file, in order (signing certificate, then its chain).
pub fn read_pem_certificates(path: &Path) -> Result<Vec<Vec<u8>>, SigningError> {
    let bytes = super::read_bounded(path, MAX_CA_FILE)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            SigningError::Certificate(format!("{}: not a PEM certificate: {e}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(SigningError::Certificate(format!(
            "{}: no PEM certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// The reference verifier's rule: the signing certificate must allow digital signatures
/// (KeyUsage) or code signing (ExtendedKeyUsage). webpki already refused an EKU list without
/// code signing; a KeyUsage without digitalSignature is refused here.
fn check_usable_for_signing(cert: &x509_cert::Certificate) -> Result<(), SigningError> {
    let tbs = &cert.tbs_certificate;
    let bad = |e: x509_cert::der::Error| SigningError::Certificate(format!("bad extension: {e}"));
    let key_usage = tbs.get::<KeyUsage>().map_err(bad)?;
    let eku = tbs.get::<ExtendedKeyUsage>().map_err(bad)?;
    let code_signing = eku.as_ref().is_some_and(|(_, e)| {
        e.0.contains(&x509_cert::der::oid::db::rfc5280::ID_KP_CODE_SIGNING)
    });
    match key_usage {
        Some((_, ku)) if !ku.digital_signature() => Err(SigningError::Certificate(
            "the signing certificate's key usage does not allow digital signatures".into(),
        )),
        None if !code_signing => Err(SigningError::Certificate(
            "the signing certificate allows neither digital signatures (KeyUsage) nor code signing (ExtendedKeyUsage)".into(),
        )),
        _ => Ok(()),
    }
}

fn chain_error(e: webpki::Error) -> SigningError {
    use webpki::Error as E;
    let reason = match e {
        E::CertExpired { .. } => "the signing certificate (or one in its chain) has expired".into(),
        E::CertNotValidYet { .. } => {
            "the signing certificate (or one in its chain) is not valid yet".into()
        }
        E::UnknownIssuer => "the certificate chain does not lead to a trusted CA".into(),
        E::RequiredEkuNotFoundContext(_) => {
            "the signing certificate is not valid for code signing (ExtendedKeyUsage)".into()
        }
        E::InvalidSignatureForPublicKey => {
            "a signature in the chain does not verify with its issuer's key".into()
        }
        E::CaUsedAsEndEntity => "the signing certificate is a CA certificate".into(),
        other => format!("the certificate chain is invalid: {other:?}"),
    };
    SigningError::Certificate(reason)
}
