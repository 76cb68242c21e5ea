//! The Kubernetes objects the controller reads, from either source, and how
//! one document becomes one typed object (or a named error).

use std::fmt;

use gateway_api::apis::standard::gatewayclasses::GatewayClass;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::referencegrants::ReferenceGrant;
// The experimental channel: a superset of standard that has `retry`.
use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute as HTTPRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;

use super::crds::{
    AuthorizationPolicy, DestinationRule, EXTENSIONS_GROUP, PeerAuthentication, TrafficPolicy,
};

/// One typed object. Its Debug form never shows a Secret's values.
#[derive(Clone)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    ServiceAccount(Box<ServiceAccount>),
    Node(Box<Node>),
    GatewayClass(Box<GatewayClass>),
    Gateway(Box<Gateway>),
    HttpRoute(Box<HTTPRoute>),
    ReferenceGrant(Box<ReferenceGrant>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    PeerAuthentication(Box<PeerAuthentication>),
    DestinationRule(Box<DestinationRule>),
    TrafficPolicy(Box<TrafficPolicy>),
    Secret(Box<Secret>),
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Key material must not reach a log, even at debug level (nor
            // metadata: kubectl's last-applied annotation holds the data).
            Object::Secret(s) => f
                .debug_struct("Secret")
                .field("namespace", &s.metadata.namespace)
                .field("name", &s.metadata.name)
                .field("type", &s.type_)
                .field(
                    "keys",
                    &s.data.iter().flat_map(|d| d.keys()).collect::<Vec<_>>(),
                )
                .finish_non_exhaustive(),
            Object::Namespace(o) => f.debug_tuple("Namespace").field(o).finish(),
            Object::Pod(o) => f.debug_tuple("Pod").field(o).finish(),
            Object::Service(o) => f.debug_tuple("Service").field(o).finish(),
            Object::EndpointSlice(o) => f.debug_tuple("EndpointSlice").field(o).finish(),
            Object::ServiceAccount(o) => f.debug_tuple("ServiceAccount").field(o).finish(),
            Object::Node(o) => f.debug_tuple("Node").field(o).finish(),
            Object::GatewayClass(o) => f.debug_tuple("GatewayClass").field(o).finish(),
            Object::Gateway(o) => f.debug_tuple("Gateway").field(o).finish(),
            Object::HttpRoute(o) => f.debug_tuple("HttpRoute").field(o).finish(),
            Object::ReferenceGrant(o) => f.debug_tuple("ReferenceGrant").field(o).finish(),
            Object::AuthorizationPolicy(o) => {
                f.debug_tuple("AuthorizationPolicy").field(o).finish()
            }
            Object::PeerAuthentication(o) => f.debug_tuple("PeerAuthentication").field(o).finish(),
            Object::DestinationRule(o) => f.debug_tuple("DestinationRule").field(o).finish(),
            Object::TrafficPolicy(o) => f.debug_tuple("TrafficPolicy").field(o).finish(),
        }
    }
}

/// Merges `stringData` into `data` as the API server does on write (a key
/// in both takes the `stringData` value), so both sources yield the same.
pub fn merge_string_data(mut s: Secret) -> Secret {
    if let Some(sd) = s.string_data.take() {
        let data = s.data.get_or_insert_with(Default::default);
        for (k, v) in sd {
            data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
        }
    }
    s
}

/// What identifies an object: kind, namespace (empty when cluster-scoped), name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{:?}/{}", self.kind, self.name)
        } else {
            write!(f, "{:?}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    ServiceAccount,
    Node,
    GatewayClass,
    Gateway,
    HttpRoute,
    ReferenceGrant,
    AuthorizationPolicy,
    PeerAuthentication,
    DestinationRule,
    TrafficPolicy,
    Secret,
}

impl Kind {
    /// The kind from its Kubernetes name.
    pub fn from_name(kind: &str) -> Option<Kind> {
        Some(match kind {
            "Namespace" => Kind::Namespace,
            "Pod" => Kind::Pod,
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "ServiceAccount" => Kind::ServiceAccount,
            "Node" => Kind::Node,
            "GatewayClass" => Kind::GatewayClass,
            "Gateway" => Kind::Gateway,
            "HTTPRoute" => Kind::HttpRoute,
            "ReferenceGrant" => Kind::ReferenceGrant,
            "AuthorizationPolicy" => Kind::AuthorizationPolicy,
            "PeerAuthentication" => Kind::PeerAuthentication,
            "DestinationRule" => Kind::DestinationRule,
            "TrafficPolicy" => Kind::TrafficPolicy,
            "Secret" => Kind::Secret,
            _ => return None,
        })
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node | Kind::GatewayClass)
    }

    /// Whether an object of this kind only ever widens access (a
    /// ReferenceGrant): a version of it that cannot be read must not leave
    /// the last good one in force.
    pub fn widens_access(self) -> bool {
        matches!(self, Kind::ReferenceGrant)
    }
}

impl ObjectKey {
    /// The key read straight off a raw document (which may not parse), with
    /// namespaced kinds defaulting to `default_ns`.
    pub fn of_raw(v: &serde_json::Value, default_ns: &str) -> Option<ObjectKey> {
        let raw_kind = v.get("kind")?.as_str()?;
        let mut name = v.pointer("/metadata/name")?.as_str()?.to_string();
        // A GRPCRoute is held as the HTTPRoute it amounts to.
        let kind = if raw_kind == "GRPCRoute" {
            name = super::grpcroute::model_name(&name);
            Kind::HttpRoute
        } else {
            Kind::from_name(raw_kind)?
        };
        let ns = v
            .pointer("/metadata/namespace")
            .and_then(|x| x.as_str())
            .unwrap_or("");
        let namespace = match (kind.namespaced(), ns) {
            (false, _) => String::new(),
            (true, "") => default_ns.to_string(),
            (true, ns) => ns.to_string(),
        };
        Some(ObjectKey {
            kind,
            namespace,
            name,
        })
    }
}

/// Why a document was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("not an object with apiVersion and kind")]
    NotAnObject,
    #[error("unknown kind {kind:?} (apiVersion {api_version:?})")]
    UnknownKind { api_version: String, kind: String },
    #[error("{kind} {name:?}: {reason}")]
    Invalid {
        kind: String,
        name: String,
        reason: String,
    },
    #[error("{kind} {name:?}: unknown field {field:?}")]
    UnknownField {
        kind: String,
        name: String,
        field: String,
    },
}

/// Kinds a Kubernetes folder commonly holds that the controller has no use
/// for: taken silently rather than reported.
const IGNORED_KINDS: &[&str] = &[
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
    "ConfigMap",
    "Endpoints",
    "CustomResourceDefinition",
];

fn typed<T: DeserializeOwned>(
    v: serde_json::Value,
    kind: &str,
    name: &str,
) -> Result<T, ObjectError> {
    let mut unknown = Vec::new();
    // serde_ignored marks Option layers with "?"; users know paths without them.
    let out: T =
        serde_ignored::deserialize(v, |path| unknown.push(path.to_string().replace("?.", "")))
            .map_err(|e| ObjectError::Invalid {
                kind: kind.to_string(),
                name: name.to_string(),
                reason: e.to_string(),
            })?;
    // `status` is written by the cluster, and kinds evolve there: only spec
    // and metadata fields must be ones we know.
    // apiVersion and kind were checked when the type was chosen.
    if let Some(field) = unknown
        .into_iter()
        .find(|p| !p.starts_with("status") && p != "apiVersion" && p != "kind")
    {
        return Err(ObjectError::UnknownField {
            kind: kind.to_string(),
            name: name.to_string(),
            field,
        });
    }
    Ok(out)
}

impl Object {
    /// Parses one document. `Ok(None)` is a kind the controller ignores.
    pub fn parse(v: serde_json::Value) -> Result<Option<Object>, ObjectError> {
        let api_version = v
            .get("apiVersion")
            .and_then(|x| x.as_str())
            .ok_or(ObjectError::NotAnObject)?
            .to_string();
        let kind = v
            .get("kind")
            .and_then(|x| x.as_str())
            .ok_or(ObjectError::NotAnObject)?
            .to_string();
        let name = v
            .pointer("/metadata/name")
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string();
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let k = kind.as_str();
        let obj = match (group, k) {
            ("", "Namespace") => Object::Namespace(Box::new(typed(v, k, &name)?)),
            ("", "Pod") => Object::Pod(Box::new(typed(v, k, &name)?)),
            ("", "Service") => Object::Service(Box::new(typed(v, k, &name)?)),
            ("", "ServiceAccount") => Object::ServiceAccount(Box::new(typed(v, k, &name)?)),
            ("", "Secret") => Object::Secret(Box::new(merge_string_data(typed(v, k, &name)?))),
            ("", "Node") => Object::Node(Box::new(typed(v, k, &name)?)),
            ("discovery.k8s.io", "EndpointSlice") => {
                Object::EndpointSlice(Box::new(typed(v, k, &name)?))
            }
            ("gateway.networking.k8s.io", "GatewayClass") => {
                Object::GatewayClass(Box::new(typed(v, k, &name)?))
            }
            ("gateway.networking.k8s.io", "Gateway") => {
                Object::Gateway(Box::new(typed(v, k, &name)?))
            }
            ("gateway.networking.k8s.io", "HTTPRoute") => {
                Object::HttpRoute(Box::new(typed(v, k, &name)?))
            }
            // Checked as a GRPCRoute (its own fields), then read as the
            // HTTPRoute it amounts to (grpcroute.rs).
            ("gateway.networking.k8s.io", "GRPCRoute") => {
                let http =
                    super::grpcroute::to_http_route(&v).map_err(|e| ObjectError::Invalid {
                        kind: kind.clone(),
                        name: name.clone(),
                        reason: e.to_string(),
                    })?;
                typed::<GrpcRoute>(v, k, &name)?;
                Object::HttpRoute(Box::new(typed(http, k, &name)?))
            }
            ("gateway.networking.k8s.io", "ReferenceGrant") => {
                Object::ReferenceGrant(Box::new(typed(v, k, &name)?))
            }
            ("security.istio.io", "AuthorizationPolicy") => {
                Object::AuthorizationPolicy(Box::new(typed(v, k, &name)?))
            }
            ("security.istio.io", "PeerAuthentication") => {
                Object::PeerAuthentication(Box::new(typed(v, k, &name)?))
            }
            ("networking.istio.io", "DestinationRule") => {
                Object::DestinationRule(Box::new(typed(v, k, &name)?))
            }
            (EXTENSIONS_GROUP, "TrafficPolicy") => {
                Object::TrafficPolicy(Box::new(typed(v, k, &name)?))
            }
            (_, k) if IGNORED_KINDS.contains(&k) => return Ok(None),
            _ => return Err(ObjectError::UnknownKind { api_version, kind }),
        };
        if obj.key().name.is_empty() {
            return Err(ObjectError::Invalid {
                kind,
                name,
                reason: "metadata.name is required".into(),
            });
        }
        Ok(Some(obj))
    }

    pub fn key(&self) -> ObjectKey {
        fn k(
            kind: Kind,
            m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        ) -> ObjectKey {
            ObjectKey {
                kind,
                namespace: m.namespace.clone().unwrap_or_default(),
                name: m.name.clone().unwrap_or_default(),
            }
        }
        match self {
            Object::Namespace(o) => k(Kind::Namespace, &o.metadata),
            Object::Pod(o) => k(Kind::Pod, &o.metadata),
            Object::Service(o) => k(Kind::Service, &o.metadata),
            Object::EndpointSlice(o) => k(Kind::EndpointSlice, &o.metadata),
            Object::ServiceAccount(o) => k(Kind::ServiceAccount, &o.metadata),
            Object::Node(o) => k(Kind::Node, &o.metadata),
            Object::GatewayClass(o) => k(Kind::GatewayClass, &o.metadata),
            Object::Gateway(o) => k(Kind::Gateway, &o.metadata),
            Object::HttpRoute(o) => k(Kind::HttpRoute, &o.metadata),
            Object::ReferenceGrant(o) => k(Kind::ReferenceGrant, &o.metadata),
            Object::AuthorizationPolicy(o) => k(Kind::AuthorizationPolicy, &o.metadata),
            Object::PeerAuthentication(o) => k(Kind::PeerAuthentication, &o.metadata),
            Object::DestinationRule(o) => k(Kind::DestinationRule, &o.metadata),
            Object::TrafficPolicy(o) => k(Kind::TrafficPolicy, &o.metadata),
            Object::Secret(o) => k(Kind::Secret, &o.metadata),
        }
    }

    /// Namespaced kinds without a namespace land in `default`, as kubectl does.
    pub fn default_namespace(&mut self, ns: &str) {
        let m = match self {
            Object::Namespace(_) | Object::Node(_) | Object::GatewayClass(_) => return,
            Object::Pod(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::ServiceAccount(o) => &mut o.metadata,
            Object::Gateway(o) => &mut o.metadata,
            Object::HttpRoute(o) => &mut o.metadata,
            Object::ReferenceGrant(o) => &mut o.metadata,
            Object::AuthorizationPolicy(o) => &mut o.metadata,
            Object::PeerAuthentication(o) => &mut o.metadata,
            Object::DestinationRule(o) => &mut o.metadata,
            Object::TrafficPolicy(o) => &mut o.metadata,
            Object::Secret(o) => &mut o.metadata,
        };
        if m.namespace.as_deref().unwrap_or("").is_empty() {
            m.namespace = Some(ns.to_string());
        }
    }
}

/// A change to the model's inputs.
#[derive(Clone, Debug)]
pub enum Change {
    Upsert(Object),
    Delete(ObjectKey),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_merges_string_data_over_data_and_never_debug_prints_values() {
        // "c2VjcmV0LWNydA==" is "secret-crt"; stringData wins for tls.key.
        let v: serde_json::Value = serde_yaml::from_str(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: cert, namespace: shop, annotations: {last-applied: secret-note}}\ntype: kubernetes.io/tls\n\
             data: {tls.crt: c2VjcmV0LWNydA==, tls.key: b2xk}\nstringData: {tls.key: secret-key}\n",
        )
        .expect("yaml");
        let Ok(Some(Object::Secret(s))) = Object::parse(v) else {
            panic!("a Secret")
        };
        let data = s.data.as_ref().expect("data");
        assert_eq!(data["tls.crt"].0, b"secret-crt");
        assert_eq!(data["tls.key"].0, b"secret-key");
        assert!(s.string_data.is_none());
        let shown = format!("{:?}", Object::Secret(s));
        assert!(shown.contains("tls.key"), "{shown}");
        assert!(
            !shown.contains("secret-") && !shown.contains("115, 101, 99"),
            "{shown}"
        );
    }
}
