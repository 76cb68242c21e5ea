//! Request and response bodies stream through the waypoint and the ingress
//! gateway with flow control: a 1 GiB upload and a 1 GiB download each way
//! leave the proxy's memory where it was (RSS measured from /proc while the
//! transfer runs). A request whose body fits the retry buffer is retried;
//! one that outgrows it is forwarded once and says why it was not retried.
//! Trailers pass both ways. Every client is curl, except for trailers
//! (curl cannot send them): `labapp trailers`, hyper's client.

use std::time::Duration;

#[path = "http/common.rs"]
mod common;
use common::*;

const GIB: u64 = 1 << 30;
/// The most RSS a 1 GiB transfer may add to a proxy.
const RSS_BOUND: u64 = 32 << 20;

fn code_and_body(out: &str) -> (Option<u16>, &str) {
    let (body, code) = out.rsplit_once("code=").unwrap_or((out, ""));
    (code.trim().get(..3).and_then(|c| c.parse().ok()), body)
}

#[tokio::test]
async fn bodies_stream_with_flow_control_and_retry_only_while_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path(), "").await;
    let lab = &g.0;
    let wp = pid(lab, WAYPOINT);
    let ingress = pid(lab, INGRESS);

    // 1 GiB up through the waypoint (HTTP/1.1, chunked), then down.
    let up = format!(
        "head -c {GIB} /dev/zero | curl -sS --max-time 240 -H 'Expect:' -T - http://sink.shop/upload -w 'code=%{{http_code}}'"
    );
    let t = std::time::Instant::now();
    let (out, grew) = with_rss(wp, || sh(lab, CLIENT, &up));
    eprintln!(
        "1 GiB up via the waypoint: {:?}, RSS +{grew}\n{out}",
        t.elapsed()
    );
    assert!(
        out.contains("x-request-id"),
        "not through the waypoint: {out}"
    );
    let (code, body) = code_and_body(&out);
    assert_eq!(code, Some(200), "{out}");
    assert!(body.contains(&format!("body-bytes: {GIB}\n")), "{out}");
    assert!(
        grew < RSS_BOUND,
        "waypoint RSS grew {grew} bytes on a 1 GiB upload"
    );
    let down = format!(
        "curl -sS --max-time 240 -o /dev/null -w 'size=%{{size_download}} code=%{{http_code}}' 'http://sink.shop/_bytes?n={GIB}'"
    );
    let t = std::time::Instant::now();
    let (out, grew) = with_rss(wp, || sh(lab, CLIENT, &down));
    eprintln!(
        "1 GiB down via the waypoint: {:?}, RSS +{grew}: {out}",
        t.elapsed()
    );
    assert!(out.contains(&format!("size={GIB} code=200")), "{out}");
    assert!(
        grew < RSS_BOUND,
        "waypoint RSS grew {grew} bytes on a 1 GiB download"
    );

    // HTTP/2 (h2c) up through the waypoint to an HTTP/2 upstream.
    let up_h2 = format!(
        "head -c {} /dev/zero | curl -sS --max-time 120 --http2-prior-knowledge -T - http://sink-h2.shop/upload -w 'code=%{{http_code}}'",
        256u64 << 20
    );
    let (out, grew) = with_rss(wp, || sh(lab, CLIENT, &up_h2));
    assert!(
        out.contains(&format!("body-bytes: {}\n", 256u64 << 20)),
        "{out}"
    );
    assert!(
        out.contains("HTTP/2.0") || out.contains("code=200"),
        "{out}"
    );
    assert!(
        grew < RSS_BOUND,
        "waypoint RSS grew {grew} bytes on an h2 upload"
    );

    through_the_ingress(lab, ingress);
    retry_buffer(dir.path(), lab);

    // Trailers both ways: HTTP/1.1 end to end, and HTTP/2 end to end.
    for (url, h2) in [
        ("http://sink.shop/t", false),
        ("http://sink-h2.shop/t", true),
    ] {
        let mut cmd = vec!["labapp", "trailers", url];
        if h2 {
            cmd.push("--h2");
        }
        let out = text(&lab.exec(CLIENT, &cmd).unwrap());
        assert!(out.starts_with("200"), "{out}");
        assert!(
            out.contains("trailer x-checksum: 1234"),
            "request trailers: {out}"
        );
        assert!(
            out.contains("response-trailer x-echo-x-checksum: 1234"),
            "response trailers: {out}"
        );
    }
}

/// 1 GiB up and down through the ingress gateway, from outside the mesh.
fn through_the_ingress(lab: &e2e::lab::Lab, ingress: u32) {
    // The same through the ingress gateway, from outside the mesh.
    let url = ingress_url(lab, "/upload");
    let script = format!(
        "head -c {GIB} /dev/zero | curl -sS --max-time 240 -H 'Expect:' -T - --resolve {HOST}:{p}:127.0.0.1 {url} -w 'code=%{{http_code}}'",
        p = ingress_port(lab)
    );
    let (out, grew) = with_rss(ingress, || {
        text(
            &std::process::Command::new("sh")
                .args(["-c", &script])
                .output()
                .unwrap(),
        )
    });
    eprintln!("1 GiB up via the ingress: RSS +{grew}\n{out}");
    assert!(out.contains(&format!("body-bytes: {GIB}\n")), "{out}");
    assert!(
        grew < RSS_BOUND,
        "ingress RSS grew {grew} bytes on a 1 GiB upload"
    );
    let url = ingress_url(lab, &format!("/_bytes?n={GIB}"));
    let (out, grew) = with_rss(ingress, || {
        text(&host_curl(
            lab,
            &[
                "--max-time",
                "240",
                "-o",
                "/dev/null",
                "-w",
                "size=%{size_download} code=%{http_code}",
                &url,
            ],
        ))
    });
    eprintln!("1 GiB down via the ingress: RSS +{grew}: {out}");
    assert!(out.contains(&format!("size={GIB} code=200")), "{out}");
    assert!(
        grew < RSS_BOUND,
        "ingress RSS grew {grew} bytes on a 1 GiB download"
    );
}

/// A body that fits the retry buffer is retried; one that does not is
/// forwarded once, logged and counted.
fn retry_buffer(dir: &std::path::Path, lab: &e2e::lab::Lab) {
    // A 2 MiB POST fits the retry buffer (4 MiB by default): the first
    // attempt's 503 is retried, and the retry carries the whole body.
    let before = served(lab, "shop/flaky-0");
    fail_next(lab, "shop/flaky-0", 1);
    let out = sh(
        lab,
        CLIENT,
        "head -c 2097152 /dev/zero | curl -sS --max-time 60 --data-binary @- http://flaky.shop/two -w 'code=%{http_code}'",
    );
    let (code, body) = code_and_body(&out);
    assert_eq!(code, Some(200), "{out}");
    assert!(body.contains("body-bytes: 2097152\n"), "{out}");
    assert_eq!(served(lab, "shop/flaky-0"), before + 2, "one retry");

    // A 64 MiB POST outgrows it: forwarded once, its 503 passed on.
    let before = served(lab, "shop/flaky-0");
    fail_next(lab, "shop/flaky-0", 1);
    let out = sh(
        lab,
        CLIENT,
        &format!(
            "head -c {} /dev/zero | curl -sS --max-time 60 -X POST -H 'Expect:' -T - http://flaky.shop/sixty-four -w 'code=%{{http_code}}'",
            64u64 << 20
        ),
    );
    let (code, body) = code_and_body(&out);
    assert_eq!(code, Some(503), "{out}");
    assert!(
        body.contains(&format!("body-bytes: {}\n", 64u64 << 20)),
        "{out}"
    );
    assert_eq!(served(lab, "shop/flaky-0"), before + 1, "not retried");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let logged = || {
        log(dir, WAYPOINT).lines().any(|l| {
            l.contains("path=/sixty-four")
                && l.contains("not retryable: body over the retry buffer")
        })
    };
    while !logged() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(logged(), "no access log line for the 64 MiB POST");
    let m = metrics(lab, WAYPOINT);
    assert!(
        metric_sum(&m, "waypoint_retry_buffer_overflows_total", &["flaky.shop"]) >= 1.0,
        "{m}"
    );
}
