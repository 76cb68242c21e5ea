//! The mesh root in a Secret (Istio's `istio-ca-secret` layout: `ca-cert.pem`
//! and `ca-key.pem`). The first replica to start creates it; a replica that
//! loses the create race (409 AlreadyExists) reads the winner's, so every
//! replica signs with one root. An existing Secret is never overwritten: a
//! damaged one is an error naming what is wrong.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::ca::issue::Issuer;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use tracing::info;

use super::{ClusterError, MANAGED_BY, status_code};

pub const CA_CERT_KEY: &str = "ca-cert.pem";
pub const CA_KEY_KEY: &str = "ca-key.pem";
/// Istio's type for its self-signed root Secret.
pub const SECRET_TYPE: &str = "istio.io/ca-root";
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The root certificate and key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootPem {
    pub cert: String,
    pub key: String,
}

fn from_secret(name: &str, s: &Secret) -> Result<RootPem, ClusterError> {
    let bad = |reason: String| ClusterError::CaSecret {
        name: name.to_string(),
        reason,
    };
    let data = s.data.as_ref();
    let field = |k: &str| -> Result<String, ClusterError> {
        let v = data
            .and_then(|d| d.get(k))
            .ok_or_else(|| bad(format!("has no {k:?} key")))?;
        String::from_utf8(v.0.clone()).map_err(|_| bad(format!("{k:?} is not UTF-8 PEM")))
    };
    let root = RootPem {
        cert: field(CA_CERT_KEY)?,
        key: field(CA_KEY_KEY)?,
    };
    // Parse now, so a damaged Secret fails start-up with its name.
    Issuer::from_pem(&root.cert, &root.key).map_err(|e| bad(e.to_string()))?;
    Ok(root)
}

fn new_secret(name: &str, root: &RootPem) -> Secret {
    let mut data = BTreeMap::new();
    data.insert(
        CA_CERT_KEY.to_string(),
        ByteString(root.cert.clone().into_bytes()),
    );
    data.insert(
        CA_KEY_KEY.to_string(),
        ByteString(root.key.clone().into_bytes()),
    );
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_string(),
                MANAGED_BY.1.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.to_string()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Reads the root from the Secret, creating it (with a new self-signed
/// root) when there is none.
pub async fn load_or_create(
    api: &Api<Secret>,
    name: &str,
    trust_domain: &str,
) -> Result<RootPem, ClusterError> {
    // Two rounds suffice: a lost create race is followed by a read of the
    // winner's Secret; more means the Secret keeps vanishing.
    for _ in 0..3 {
        if let Some(s) = api
            .get_opt(name)
            .await
            .map_err(ClusterError::api(format!("reading Secret {name}")))?
        {
            let root = from_secret(name, &s)?;
            info!(secret = name, "loaded the mesh root CA from its Secret");
            return Ok(root);
        }
        let issuer = Issuer::new_root(trust_domain, std::time::SystemTime::now(), ROOT_VALIDITY)
            .map_err(|e| ClusterError::Invalid(format!("making a root CA: {e}")))?;
        let root = RootPem {
            cert: issuer.cert_pem().to_string(),
            key: issuer.key_pem(),
        };
        match api
            .create(&PostParams::default(), &new_secret(name, &root))
            .await
        {
            Ok(_) => {
                info!(
                    secret = name,
                    "created a new self-signed mesh root CA in its Secret"
                );
                return Ok(root);
            }
            Err(e) if status_code(&e) == Some(409) => {
                info!(
                    secret = name,
                    "another replica created the CA Secret first; using theirs"
                );
            }
            Err(e) => return Err(ClusterError::api(format!("creating Secret {name}"))(e)),
        }
    }
    Err(ClusterError::CaSecret {
        name: name.to_string(),
        reason: "was created by another replica but cannot be read back".into(),
    })
}
