//! Where the CA's key material comes from: a self-signed root kept in the
//! data directory (made on first start), or an operator's CA in Istio's
//! `cacerts` layout so an enterprise PKI can sign the mesh.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::ca::issue::Issuer;
use mesh_core::clock::Clock;
use mesh_core::identity::Identity;
use mesh_core::tls::{TrustRoots, parse_pem_certs, verify_workload_chain};

use super::CertificateAuthority;

const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

#[derive(Debug, Clone)]
pub enum CaSource {
    /// `root-cert.pem` and `root-key.pem` in this directory, created on first
    /// start (key mode 0600).
    SelfSigned { dir: PathBuf },
    /// Istio's plug-in layout: `ca-cert.pem` and `ca-key.pem` (the signing CA,
    /// root or intermediate), `root-cert.pem`, and optionally `cert-chain.pem`
    /// (the signing CA up to the root).
    Plugged { dir: PathBuf },
    /// A self-signed root already in hand (cluster mode: read from, or
    /// just written to, the CA Secret).
    Root { cert_pem: String, key_pem: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CaLoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{0}: found one of root-cert.pem/root-key.pem without the other; refusing to overwrite"
    )]
    HalfPresent(PathBuf),
    #[error("the CA's own test certificate does not verify to its roots: {0}")]
    SelfTest(String),
}

fn read(path: &Path) -> Result<String, CaLoadError> {
    fs::read_to_string(path).map_err(|source| CaLoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(path: &Path, reason: impl ToString) -> CaLoadError {
    CaLoadError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Writes a new file that must not exist yet, with the given mode.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CaLoadError> {
    let io = |source| CaLoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

impl CertificateAuthority {
    /// Loads (or on first start creates) the CA. `extra_roots` is a PEM file
    /// of further roots to publish and trust, for a root rotation.
    pub fn load(
        source: &CaSource,
        trust_domain: &str,
        extra_roots: Option<&Path>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, CaLoadError> {
        let (issuer, chain_pem, mut root_bundle) = match source {
            CaSource::SelfSigned { dir } => self_signed(dir, trust_domain, clock.as_ref())?,
            CaSource::Plugged { dir } => plugged(dir)?,
            CaSource::Root { cert_pem, key_pem } => {
                let issuer = Issuer::from_pem(cert_pem, key_pem)
                    .map_err(|e| invalid(Path::new("CA Secret"), e))?;
                (issuer, Vec::new(), cert_pem.clone())
            }
        };
        if let Some(path) = extra_roots {
            let pem = read(path)?;
            parse_pem_certs(&pem, "extra roots").map_err(|e| invalid(path, e))?;
            if !root_bundle.ends_with('\n') {
                root_bundle.push('\n');
            }
            root_bundle.push_str(&pem);
        }
        let root_certs = parse_pem_certs(&root_bundle, "root bundle")
            .map_err(|e| CaLoadError::SelfTest(e.to_string()))?;
        let roots = TrustRoots::new(root_certs.clone())
            .map_err(|e| CaLoadError::SelfTest(e.to_string()))?;
        let ca = CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            issuer,
            chain_pem,
            root_bundle_pem: root_bundle,
            roots,
            clock,
        };
        ca.self_test(root_certs)?;
        Ok(ca)
    }

    // Issue a throwaway leaf and verify it exactly as a peer would, so a
    // mismatched plug-in chain fails at start-up rather than in every handshake.
    fn self_test(
        &self,
        roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    ) -> Result<(), CaLoadError> {
        let fail = |e: &dyn std::fmt::Display| CaLoadError::SelfTest(e.to_string());
        let probe = Identity::new(&self.trust_domain, "istio-system", "ca-self-test")
            .map_err(|e| fail(&e))?;
        let now = self.clock.now();
        let mut intermediates = Vec::new();
        for pem in &self.chain_pem {
            intermediates.extend(parse_pem_certs(pem, "chain").map_err(|e| fail(&e))?);
        }
        let cert = self
            .issuer
            .issue_workload(
                &probe,
                now - Duration::from_secs(60),
                now + Duration::from_secs(3600),
                &intermediates,
                roots,
            )
            .map_err(|e| fail(&e))?;
        verify_workload_chain(&self.roots, cert.chain(), now).map_err(|e| fail(&e))?;
        Ok(())
    }
}

fn self_signed(
    dir: &Path,
    trust_domain: &str,
    clock: &dyn Clock,
) -> Result<(Issuer, Vec<String>, String), CaLoadError> {
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let cert = read(&cert_path)?;
            let issuer =
                Issuer::from_pem(&cert, &read(&key_path)?).map_err(|e| invalid(&key_path, e))?;
            tracing::info!(path = %cert_path.display(), "loaded the mesh root CA");
            Ok((issuer, Vec::new(), cert))
        }
        (false, false) => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| CaLoadError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
            let issuer = Issuer::new_root(trust_domain, clock.now(), ROOT_VALIDITY)
                .map_err(|e| invalid(&cert_path, e))?;
            // Key first: a crash between the two writes leaves no cert that
            // has no key.
            write_new(&key_path, &issuer.key_pem(), 0o600)?;
            write_new(&cert_path, issuer.cert_pem(), 0o644)?;
            tracing::info!(path = %cert_path.display(), "created a new self-signed mesh root CA");
            let cert = issuer.cert_pem().to_string();
            Ok((issuer, Vec::new(), cert))
        }
        _ => Err(CaLoadError::HalfPresent(dir.to_path_buf())),
    }
}

fn plugged(dir: &Path) -> Result<(Issuer, Vec<String>, String), CaLoadError> {
    let ca_cert_path = dir.join("ca-cert.pem");
    let ca_key_path = dir.join("ca-key.pem");
    let root_path = dir.join("root-cert.pem");
    let chain_path = dir.join("cert-chain.pem");
    let ca_cert = read(&ca_cert_path)?;
    let issuer =
        Issuer::from_pem(&ca_cert, &read(&ca_key_path)?).map_err(|e| invalid(&ca_key_path, e))?;
    let root_pem = read(&root_path)?;
    let roots = parse_pem_certs(&root_pem, "root").map_err(|e| invalid(&root_path, e))?;
    let mut chain = Vec::new();
    if !roots.contains(issuer.cert_der()) {
        chain.push(issuer.cert_pem().to_string());
        if chain_path.exists() {
            let text = read(&chain_path)?;
            for der in parse_pem_certs(&text, "chain").map_err(|e| invalid(&chain_path, e))? {
                if der != *issuer.cert_der() && !roots.contains(&der) {
                    chain.push(pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())));
                }
            }
        }
    }
    tracing::info!(dir = %dir.display(), intermediates = chain.len(), "loaded a plugged-in CA");
    Ok((issuer, chain, root_pem))
}
