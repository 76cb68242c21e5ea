//! CUSTOM AuthorizationPolicies: the extension provider a policy names,
//! resolved from the mesh config into what a waypoint dials, and what
//! happens where a provider cannot be asked.
//!
//! - At a waypoint (`targetRefs`), a CUSTOM policy is sent as it is, with
//!   its provider's address (the Service's cluster IP and the provider's
//!   port), timeout, failOpen and statusOnError (`waypoint.rs`).
//! - A ztunnel cannot ask a provider: a CUSTOM policy without targets is
//!   enforced there as a DENY of what its rules match at L4 (fail closed),
//!   and reported (`authz.rs`).
//! - A policy whose provider is missing, unknown or unusable denies every
//!   request (or connection) in its scope, and is reported.

use std::net::IpAddr;

use mesh_proto::mesh::waypoint as pb;

use super::{Dirty, Model, NsName};
use crate::config::crds::{AuthorizationAction, AuthorizationPolicy};
use crate::config::mesh::{ExtAuthzGrpc, Provider};

/// Why a CUSTOM policy has no provider it can use (it then denies what it
/// applies to).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderRefError {
    #[error("action CUSTOM names no provider")]
    Unnamed,
    #[error("provider {0:?} is not among the mesh config's extensionProviders")]
    Unknown(String),
    /// `why`: the mesh config's reason (see `Provider::Unusable`).
    #[error("provider {name:?} cannot be used: {why}")]
    Unusable { name: String, why: String },
}

/// The provider of a CUSTOM policy, ready for a waypoint, with issues that
/// do not stop it being used; Err(why) when the policy has no usable one.
pub fn resolve(
    model: &Model,
    p: &AuthorizationPolicy,
) -> Result<(pb::ExtAuthzProvider, Vec<String>), ProviderRefError> {
    let name = p
        .spec
        .provider
        .as_ref()
        .map(|r| r.name.as_str())
        .filter(|n| !n.is_empty())
        .ok_or(ProviderRefError::Unnamed)?;
    let g = match model.cfg.mesh.extension_providers.get(name) {
        None => {
            return Err(ProviderRefError::Unknown(name.to_string()));
        }
        Some(Provider::Unusable(why)) => {
            return Err(ProviderRefError::Unusable {
                name: name.to_string(),
                why: why.clone(),
            });
        }
        Some(Provider::ExtAuthzGrpc(g)) => g,
    };
    let mut issues = Vec::new();
    let address = address(model, name, g, &mut issues);
    Ok((
        pb::ExtAuthzProvider {
            name: name.to_string(),
            address,
            timeout_ms: u32::try_from(g.timeout.as_millis())
                .unwrap_or(u32::MAX)
                .max(1),
            fail_open: g.fail_open,
            status_on_error: u32::from(g.status_on_error),
        },
        issues,
    ))
}

/// The Service a provider's `[<namespace>/]<hostname>` names, when the
/// hostname is a cluster Service's (`<name>.<namespace>.svc.<suffix>`).
fn service_key(model: &Model, service: &str) -> Option<NsName> {
    let (ns, host) = match service.split_once('/') {
        Some((ns, host)) => (Some(ns), host),
        None => (None, service),
    };
    let suffix = format!(".svc.{}", model.cfg.domain_suffix);
    let (name, host_ns) = host.strip_suffix(&suffix)?.split_once('.')?;
    if host_ns.contains('.') || ns.is_some_and(|n| n != host_ns) {
        return None;
    }
    Some((host_ns.to_string(), name.to_string()))
}

/// Where a waypoint dials a provider: the Service's cluster IP, else the
/// hostname (resolved by the waypoint), which is reported.
fn address(model: &Model, name: &str, g: &ExtAuthzGrpc, issues: &mut Vec<String>) -> String {
    let host = g
        .service
        .split_once('/')
        .map_or(g.service.as_str(), |(_, h)| h);
    let vip = service_key(model, &g.service)
        .and_then(|k| model.services.get(&k))
        .and_then(|s| {
            s.spec
                .as_ref()?
                .cluster_ip
                .as_deref()?
                .parse::<IpAddr>()
                .ok()
        });
    match vip {
        Some(IpAddr::V4(ip)) => format!("{ip}:{}", g.port),
        Some(IpAddr::V6(ip)) => format!("[{ip}]:{}", g.port),
        None => {
            issues.push(format!(
                "provider {name:?}: {:?} is not a Service with a cluster IP; the waypoint resolves {host:?} by DNS",
                g.service
            ));
            format!("{host}:{}", g.port)
        }
    }
}

/// A Service that is a provider's changed: every CUSTOM policy's address
/// (and issues) may have too.
pub(super) fn mark_provider_service(model: &Model, svc: &NsName, d: &mut Dirty) {
    let is_provider = model
        .cfg
        .mesh
        .extension_providers
        .values()
        .any(|p| matches!(p, Provider::ExtAuthzGrpc(g) if service_key(model, &g.service).as_ref() == Some(svc)));
    if !is_provider {
        return;
    }
    let custom: Vec<NsName> = model
        .authz_policies
        .iter()
        .filter(|(_, p)| p.spec.action == Some(AuthorizationAction::Custom))
        .map(|(k, _)| k.clone())
        .collect();
    if custom.is_empty() {
        return;
    }
    d.policies.extend(custom);
    d.routes.extend(model.services.keys().cloned());
    d.waypoints = true;
}

/// The waypoint policy that stands for a CUSTOM policy with no usable
/// provider: a DENY whose one empty rule matches every request.
pub fn deny_all(name: String, dry_run: bool) -> pb::Policy {
    pb::Policy {
        name,
        action: pb::PolicyAction::Deny as i32,
        rules: vec![pb::PolicyRule::default()],
        provider: None,
        dry_run,
    }
}

/// A CUSTOM policy at the ztunnel: reports how it is enforced there and
/// returns true when its rules' L4 match is to be denied, false when its
/// provider is not usable and everything in its scope is to be denied.
pub fn at_ztunnel(model: &Model, p: &AuthorizationPolicy, issues: &mut Vec<String>) -> bool {
    match resolve(model, p) {
        Ok((provider, _)) => {
            issues.push(format!(
                "action CUSTOM (provider {:?}) is enforced by a waypoint only: without targetRefs the ztunnel denies what the rules match (fail closed)",
                provider.name
            ));
            true
        }
        Err(why) => {
            issues.push(format!(
                "{why}; the policy denies every connection in its scope (fail closed)"
            ));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ModelConfig;
    use super::*;
    use crate::config::mesh::MeshConfig;
    use crate::config::objects::{Change, Object};
    use mesh_proto::istio::security as l4;

    const MESH: &str = r#"
extensionProviders:
- name: authz
  envoyExtAuthzGrpc: {service: ext-authz.authz.svc.cluster.local, port: 9000, timeout: 0.5s}
- name: open
  envoyExtAuthzGrpc: {service: authz/ext-authz.authz.svc.cluster.local, port: 9000, failOpen: true, statusOnError: "503"}
- name: outside
  envoyExtAuthzGrpc: {service: authz.example.com, port: 9000}
- name: http
  envoyExtAuthzHttp: {service: ext-authz.authz.svc.cluster.local, port: 8000}
"#;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: authz}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec: {clusterIP: 10.96.0.2, ports: [{name: mesh, port: 15008}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {app: reviews}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: authz}
spec: {clusterIP: 10.96.0.9, selector: {app: ext-authz}, ports: [{name: grpc, port: 9000}]}
"#;

    fn custom(name: &str, provider: &str, attach: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  {attach}\n  action: CUSTOM\n  provider: {{name: {provider}}}\n  rules: [{{to: [{{operation: {{paths: [\"/admin*\"], ports: [\"80\"]}}}}]}}]\n---\n"
        )
    }

    fn parse(text: &str) -> Vec<Change> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .filter(|v: &serde_json::Value| !v.is_null())
            .map(|v| Change::Upsert(Object::parse(v).expect("parses").expect("known kind")))
            .collect()
    }

    fn empty_model() -> Model {
        Model::new(ModelConfig {
            mesh: MeshConfig::parse(MESH).expect("mesh config"),
            ..ModelConfig::default()
        })
    }

    fn model(extra: &str) -> Model {
        let mut m = empty_model();
        m.apply(parse(&format!("{OBJECTS}---\n{extra}")));
        m
    }

    const ON_WAYPOINT: &str =
        "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]";

    fn waypoint_policies(m: &Model) -> Vec<pb::Policy> {
        let svc = ("shop".to_string(), "reviews".to_string());
        let gw = ("shop".to_string(), "waypoint".to_string());
        super::super::waypoint::policies(m, &svc, &gw)
    }

    fn issues_of(m: &Model, policy: &str) -> Vec<String> {
        m.issues()
            .into_iter()
            .filter(|i| i.object == format!("AuthorizationPolicy/shop/{policy}"))
            .map(|i| i.reason)
            .collect()
    }

    #[test]
    fn a_custom_policy_on_a_waypoint_carries_its_resolved_provider() {
        let mut docs = custom("ext", "authz", ON_WAYPOINT);
        docs.push_str(&custom(
            "ext-open",
            "open",
            "targetRefs: [{kind: Service, group: \"\", name: reviews}]",
        ));
        let m = model(&docs);
        let got = waypoint_policies(&m);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].name, "shop/ext");
        assert_eq!(got[0].action, pb::PolicyAction::Custom as i32);
        assert_eq!(got[0].rules[0].to[0].paths, vec!["/admin*"]);
        assert_eq!(
            got[0].provider,
            Some(pb::ExtAuthzProvider {
                name: "authz".into(),
                address: "10.96.0.9:9000".into(),
                timeout_ms: 500,
                fail_open: false,
                status_on_error: 403,
            })
        );
        let open = got[1].provider.as_ref().expect("provider");
        assert!(open.fail_open);
        assert_eq!(open.status_on_error, 503);
        assert_eq!(open.timeout_ms, 600_000);
        assert!(
            issues_of(&m, "ext").is_empty(),
            "{:?}",
            issues_of(&m, "ext")
        );
        // Nothing for ztunnels: the waypoint enforces it.
        assert!(
            m.resources(mesh_proto::AUTHORIZATION_TYPE_URL)
                .is_none_or(|r| r.is_empty())
        );
    }

    #[test]
    fn a_provider_outside_the_cluster_is_dialled_by_name_and_reported() {
        let m = model(&custom("ext", "outside", ON_WAYPOINT));
        let got = waypoint_policies(&m);
        let p = got[0].provider.as_ref().expect("provider");
        assert_eq!(p.address, "authz.example.com:9000");
        let issues = issues_of(&m, "ext");
        assert!(
            issues
                .iter()
                .any(|i| i.contains("resolves \"authz.example.com\" by DNS")),
            "{issues:?}"
        );
    }

    #[test]
    fn an_unknown_or_unusable_provider_denies_everything_at_the_waypoint() {
        let mut docs = custom("unknown", "nope", ON_WAYPOINT);
        docs.push_str(&custom("http", "http", ON_WAYPOINT));
        docs.push_str(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: none, namespace: shop}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: CUSTOM\n  rules: [{}]\n",
        );
        let m = model(&docs);
        let got = waypoint_policies(&m);
        assert_eq!(got.len(), 3, "{got:?}");
        for p in &got {
            assert_eq!(p.action, pb::PolicyAction::Deny as i32, "{p:?}");
            // One empty rule: it matches every request.
            assert_eq!(p.rules, vec![pb::PolicyRule::default()], "{p:?}");
        }
        for (name, why) in [
            (
                "unknown",
                "\"nope\" is not among the mesh config's extensionProviders",
            ),
            ("http", "envoyExtAuthzHttp is not supported"),
            ("none", "names no provider"),
        ] {
            let issues = issues_of(&m, name);
            assert!(
                issues
                    .iter()
                    .any(|i| i.contains(why) && i.contains("denies every request")),
                "{name}: {issues:?}"
            );
        }
    }

    fn ztunnel_policy(m: &Model, name: &str) -> l4::Authorization {
        use prost::Message;
        let r = m
            .resources(mesh_proto::AUTHORIZATION_TYPE_URL)
            .and_then(|r| r.get(format!("shop/{name}").as_str()))
            .unwrap_or_else(|| panic!("no ztunnel policy shop/{name}"));
        l4::Authorization::decode(r.value()).expect("decodes")
    }

    #[test]
    fn a_custom_policy_without_a_waypoint_is_a_deny_of_its_l4_match_at_the_ztunnel() {
        let m = model(&custom(
            "ext",
            "authz",
            "selector: {matchLabels: {app: reviews}}",
        ));
        let a = ztunnel_policy(&m, "ext");
        assert_eq!(a.action, l4::Action::Deny as i32);
        // The rule's L4 part (port 80) is kept; its path cannot be checked.
        assert_eq!(a.rules.len(), 1, "{a:?}");
        assert_eq!(a.rules[0].clauses[0].matches[0].destination_ports, vec![80]);
        let issues = issues_of(&m, "ext");
        assert!(
            issues
                .iter()
                .any(|i| i.contains("enforced by a waypoint only") && i.contains("fail closed")),
            "{issues:?}"
        );
    }

    #[test]
    fn a_custom_policy_without_a_usable_provider_denies_its_whole_scope_at_the_ztunnel() {
        let m = model(&custom(
            "ext",
            "nope",
            "selector: {matchLabels: {app: reviews}}",
        ));
        let a = ztunnel_policy(&m, "ext");
        assert_eq!(a.action, l4::Action::Deny as i32);
        assert_eq!(a.rules, vec![l4::Rule::default()], "{a:?}");
        let issues = issues_of(&m, "ext");
        assert!(
            issues.iter().any(|i| i.contains("denies every connection")),
            "{issues:?}"
        );
    }

    #[test]
    fn the_provider_service_arriving_later_updates_the_address() {
        let mut m = empty_model();
        let (without_provider, _) = OBJECTS
            .split_once("---\napiVersion: v1\nkind: Service\nmetadata: {name: ext-authz")
            .expect("the provider's Service is last");
        let text = format!(
            "{without_provider}---\n{}",
            custom("ext", "authz", ON_WAYPOINT)
        );
        m.apply(parse(&text));
        let before = waypoint_policies(&m);
        assert_eq!(
            before[0].provider.as_ref().map(|p| p.address.as_str()),
            Some("ext-authz.authz.svc.cluster.local:9000")
        );
        let delta = m.apply(parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: ext-authz, namespace: authz}\nspec: {clusterIP: 10.96.0.9, ports: [{name: grpc, port: 9000}]}\n",
        ));
        assert!(
            delta.changed[mesh_proto::SERVICE_ROUTES_TYPE_URL]
                .contains("shop/reviews.shop.svc.cluster.local"),
            "{delta:?}"
        );
        let after = waypoint_policies(&m);
        assert_eq!(
            after[0].provider.as_ref().map(|p| p.address.as_str()),
            Some("10.96.0.9:9000")
        );
        assert!(
            issues_of(&m, "ext").is_empty(),
            "{:?}",
            issues_of(&m, "ext")
        );
    }
}
