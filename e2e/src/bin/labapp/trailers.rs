//! A client that sends a request with trailers (HTTP/1.1 chunked with a
//! `Trailer` header, or HTTP/2 with prior knowledge) and prints the status,
//! the body and the response's trailers (`trailer name: value` lines).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

#[derive(Debug, clap::Args)]
pub struct TrailersArgs {
    /// http://host[:port]/path
    url: String,
    /// HTTP/2 with prior knowledge (h2c).
    #[arg(long)]
    h2: bool,
    /// A request trailer, `name: value`.
    #[arg(long = "trailer", default_value = "x-checksum: 1234")]
    trailers: Vec<String>,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

pub async fn run(a: &TrailersArgs) -> Result<(), Box<dyn std::error::Error>> {
    tokio::time::timeout(Duration::from_millis(a.timeout_ms), exchange(a)).await?
}

async fn exchange(a: &TrailersArgs) -> Result<(), Box<dyn std::error::Error>> {
    let uri: hyper::Uri = a.url.parse()?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let mut trailers = HeaderMap::new();
    for t in &a.trailers {
        let (k, v) = t.split_once(':').ok_or("trailer is name: value")?;
        trailers.append(
            http::HeaderName::from_bytes(k.trim().as_bytes())?,
            v.trim().parse()?,
        );
    }
    let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
    let names = names.join(", ");
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"with trailers"))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures::stream::iter(frames));
    let mut req = hyper::Request::post(uri.clone())
        .header("te", "trailers")
        .header("trailer", names)
        .body(body)?;
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    let resp = if a.h2 {
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        s.send_request(req).await?
    } else {
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or(host);
        req.headers_mut()
            .insert(http::header::HOST, authority.parse()?);
        *req.uri_mut() = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()?;
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        s.send_request(req).await?
    };
    println!("{}", resp.status().as_u16());
    let collected = resp.into_body().collect().await?;
    let t = collected.trailers().cloned();
    print!("{}", String::from_utf8_lossy(&collected.to_bytes()));
    for (k, v) in t.iter().flatten() {
        println!("response-trailer {k}: {}", v.to_str().unwrap_or("?"));
    }
    Ok(())
}
