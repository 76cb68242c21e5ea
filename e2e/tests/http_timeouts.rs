//! The downstream timeouts the waypoint's config names, each as a client
//! sees it: an idle connection (no request in flight) is closed after
//! `limits.idle_timeout`, HTTP/1.1 and HTTP/2 alike, while a busy one is
//! not; a connection is closed gracefully at `limits.max_connection_duration`;
//! a stream with nothing moving either way for `limits.stream_idle_timeout`
//! is ended (a stalled download is cut, a stalled upload gets 408); a body
//! over a `limits.max_body_bytes` the user set gets 413.

use serde_json::Value;

#[path = "http/common.rs"]
mod common;
use common::*;

const LIMITS: &str = "  idle_timeout: 1s\n  stream_idle_timeout: 2s\n  max_connection_duration: 4s\n  max_body_bytes: 1048576\n";

fn conn(lab: &e2e::lab::Lab, args: &[&str]) -> Value {
    let mut cmd = vec!["labapp", "conn"];
    cmd.extend_from_slice(args);
    let out = lab.exec(CLIENT, &cmd).unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn closed_after(v: &Value) -> Option<u64> {
    v["closed_after_ms"].as_u64()
}

#[tokio::test]
async fn idle_connections_long_connections_idle_streams_and_large_bodies_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let g = start_with_limits(dir.path(), "", LIMITS).await;
    let lab = &g.0;
    let url = "http://sink.shop/";

    // Idle: one request, then nothing; closed after about a second (before
    // the lab's 2 s header timeout could close an HTTP/1.1 one).
    for h2 in [true, false] {
        let mut args = vec![url, "--limit-ms", "6000"];
        if h2 {
            args.push("--h2");
        }
        let v = conn(lab, &args);
        assert_eq!(v["ok"], 1, "h2={h2}: {v}");
        let after = closed_after(&v).unwrap_or_else(|| panic!("h2={h2}: never closed: {v}"));
        assert!(
            (700..1800).contains(&after),
            "h2={h2}: closed after {after} ms: {v}"
        );
    }

    // Busy (a request every 300 ms): not idle, open for 3 s.
    let v = conn(
        lab,
        &[url, "--h2", "--every-ms", "300", "--limit-ms", "3000"],
    );
    assert_eq!(closed_after(&v), None, "{v}");
    assert!(v["ok"].as_u64().unwrap_or(0) >= 8, "{v}");

    // Max connection duration: busy, closed gracefully at about 4 s.
    for h2 in [true, false] {
        let mut args = vec![url, "--every-ms", "300", "--limit-ms", "9000"];
        if h2 {
            args.push("--h2");
        }
        let v = conn(lab, &args);
        let after = closed_after(&v).unwrap_or_else(|| panic!("h2={h2}: never closed: {v}"));
        assert!(
            (3800..6500).contains(&after),
            "h2={h2}: closed after {after} ms: {v}"
        );
        assert!(v["ok"].as_u64().unwrap_or(0) >= 10, "h2={h2}: {v}");
    }

    // Stream idle: a download that stalls for 5 s is cut after about 2 s.
    let out = sh(
        lab,
        CLIENT,
        "curl -sS --max-time 20 -o /dev/null -w 'size=%{size_download} time=%{time_total}' 'http://sink.shop/_bytes?n=1048576&stall_ms=5000'; echo \" rc=$?\"",
    );
    assert!(
        !out.contains(" rc=0"),
        "the stalled download completed: {out}"
    );
    let time: f64 = out
        .split("time=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!((1.5..4.5).contains(&time), "cut after {time} s: {out}");
    // An upload that stalls for 5 s: 408.
    let out = sh(
        lab,
        CLIENT,
        "(head -c 1000 /dev/zero; sleep 5; head -c 1000 /dev/zero) | curl -sS --max-time 20 -H 'Expect:' -T - http://sink.shop/stall -w 'code=%{http_code} time=%{time_total}'",
    );
    assert!(out.contains("code=408"), "{out}");

    // A body limit the user set: 413 for a declared length over it, and
    // for a chunked body that grows over it.
    let out = sh(
        lab,
        CLIENT,
        "head -c 2097152 /dev/zero | curl -sS --max-time 20 --data-binary @- http://sink.shop/big -w 'code=%{http_code}'",
    );
    assert!(out.ends_with("code=413"), "{out}");
    let out = sh(
        lab,
        CLIENT,
        "head -c 2097152 /dev/zero | curl -sS --max-time 20 -H 'Expect:' -X POST -T - http://sink.shop/big -w 'code=%{http_code}'",
    );
    assert!(out.ends_with("code=413"), "{out}");
}
