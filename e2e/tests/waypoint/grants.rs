//! A route's backend in another namespace, through the waypoint: refused
//! (its share of the rule's requests answered 500, the rule's other
//! backends keeping theirs) until a ReferenceGrant in the backend's namespace permits it,
//! and refused again once the grant is deleted.

use std::time::Duration;

use e2e::lab::{Down as Guard, Lab};
use e2e::mesh::eventually;

use super::{echo, load, service, yaml};

const GRANT: &str = "apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-shop, namespace: team}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: \"\", kind: Service, name: api}]
";

#[tokio::test]
async fn a_cross_namespace_backend_is_reached_only_while_a_reference_grant_permits_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guard(Lab::create_in(dir.path(), e2e::lab::TEST_IDS, 2).unwrap());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::new();
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n---\n");
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: team, labels: {istio.io/dataplane-mode: ambient}}\n---\n");
    docs.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n");
    docs.push_str(&echo("shop", "web", 1, "", ""));
    docs.push_str(&echo("team", "api", 1, "", ""));
    docs.push_str("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: client, namespace: shop}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: client}}\n  template:\n    metadata: {labels: {app: client}}\n    spec:\n      serviceAccountName: client\n      containers: [{name: app, image: labapp, args: [sleep]}]\n---\n");
    docs.push_str(&service("shop", "web", "app: web"));
    docs.push_str(&service("team", "api", "app: api"));
    docs.push_str(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /team}}]
    backendRefs: [{name: api, namespace: team, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /both}}]
    backendRefs: [{name: web, port: 80}, {name: api, namespace: team, port: 80}]
",
    );
    g.0.apply(yaml(&docs)).await.unwrap();
    let client = "shop/client-0";

    // Until the route arrives web itself answers /team: only a 500 says
    // the waypoint has the route, without the backend it may not reach.
    let refused = |lab: &Lab| {
        let team = load(lab, client, "http://web.shop/team", 5, 1, &[]);
        team.status.get(&500).copied() == Some(5)
    };
    eventually(
        "the waypoint refuses team/api without a grant",
        Duration::from_secs(60),
        || async { refused(&g.0) },
    )
    .await;
    // The rule's own backend keeps its share; the refused backend's share
    // is answered 500 (Gateway API), never sent to team/api.
    split_with_500s(&g.0, client);

    // team agrees: both rules reach api.
    g.0.apply(yaml(GRANT)).await.unwrap();
    eventually(
        "the waypoint reaches team/api with the grant",
        Duration::from_secs(30),
        || async {
            let team = load(&g.0, client, "http://web.shop/team", 5, 1, &[]);
            team.ok() == 5 && team.by_pod.keys().all(|p| p.starts_with("api-"))
        },
    )
    .await;
    let both = load(&g.0, client, "http://web.shop/both", 100, 4, &[]);
    assert_eq!(both.ok(), 100, "{both:?}");
    for p in ["web-0", "api-0"] {
        assert!(
            both.by_pod.get(p).copied().unwrap_or(0) >= 20,
            "{p}: {both:?}"
        );
    }

    // The grant deleted: refused again on the next push.
    g.0.delete("ReferenceGrant", "team", "from-shop").unwrap();
    eventually(
        "the waypoint refuses team/api once the grant is gone",
        Duration::from_secs(30),
        || async { refused(&g.0) },
    )
    .await;
    split_with_500s(&g.0, client);
}

/// `/both` without the grant: about half from web, the rest 500s, none
/// from api.
fn split_with_500s(lab: &Lab, client: &str) {
    let both = load(lab, client, "http://web.shop/both", 100, 4, &[]);
    let errors = both.status.get(&500).copied().unwrap_or(0);
    assert_eq!(both.ok() + errors, 100, "{both:?}");
    assert!(both.ok() >= 20 && errors >= 20, "{both:?}");
    assert!(
        both.by_pod.keys().all(|p| p.starts_with("web-")),
        "{both:?}"
    );
}
