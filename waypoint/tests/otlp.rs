//! Spans leave over OTLP/HTTP (JSON) to a collector: here a real HTTP
//! server on loopback that keeps what it is sent.

use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use waypoint::telemetry::{Exporter, Span, TraceContext};

#[tokio::test]
async fn spans_reach_the_collector_with_the_request_trace() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::channel::<(String, String)>(4);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let _ = tx
                            .send((path, String::from_utf8_lossy(&body).into_owned()))
                            .await;
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });

    let exporter = Exporter::start(format!("http://{addr}"), "waypoint.shop".into());
    let ctx = TraceContext::continue_or_start(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));
    let now = SystemTime::now();
    exporter.export(Span {
        ctx: ctx.clone(),
        name: "reviews GET".into(),
        start: now,
        end: now + Duration::from_millis(3),
        attributes: vec![("http.response.status_code", "200".into())],
        error: false,
    });
    let (path, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the collector got spans in time")
        .expect("a batch");
    assert_eq!(path, "/v1/traces");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(span["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(span["spanId"], format!("{:016x}", ctx.span_id));
    assert_eq!(span["name"], "reviews GET");
    assert_eq!(
        v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
        "waypoint.shop"
    );
}
