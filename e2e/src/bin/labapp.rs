//! The application processes the lab runs inside pods: a TCP echo, an HTTP
//! echo that reports who called and with which headers, and a client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser)]
#[command(about = "Lab application: echo servers and a client")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Echo every byte back; half-close after the client does.
    TcpEcho {
        #[arg(long, default_value_t = 9000)]
        port: u16,
    },
    /// Answer every HTTP request with the caller's address, this pod's name
    /// and the request headers.
    HttpEcho {
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// GET a URL (http://ip:port/path) `count` times and print the answers.
    Get {
        url: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Send `text` over TCP to ip:port and print what comes back.
    Send { addr: SocketAddr, text: String },
    /// Resolve a name with the system resolver and print its addresses.
    Resolve { name: String },
    /// Do nothing (a pod that only runs `lab exec` commands).
    Sleep,
}

async fn tcp_echo(port: u16) -> std::io::Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn http_echo(port: u16) -> std::io::Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port)).await?;
    let me = std::env::var("POD_NAME").unwrap_or_else(|_| "unknown".into());
    loop {
        let (s, peer) = l.accept().await?;
        let me = me.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                let mut body = format!("pod={me}\npeer={peer}\n{} {}\n", req.method(), req.uri());
                for (k, v) in req.headers() {
                    body.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                }
                async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

async fn get(url: &str, count: usize) -> Result<(), Box<dyn std::error::Error>> {
    let uri: hyper::Uri = url.parse()?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let addr = format!("{host}:{port}");
    for _ in 0..count {
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)).await??;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(uri.clone())
            .header("host", &host)
            .body(Empty::<Bytes>::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        println!("{status}\n{}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

async fn send(addr: SocketAddr, text: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    s.write_all(text.as_bytes()).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    println!("{}", String::from_utf8_lossy(&out));
    Ok(())
}

#[tokio::main]
async fn main() {
    let r: Result<(), Box<dyn std::error::Error>> = match Args::parse().cmd {
        Cmd::TcpEcho { port } => tcp_echo(port).await.map_err(Into::into),
        Cmd::HttpEcho { port } => http_echo(port).await.map_err(Into::into),
        Cmd::Get { url, count } => get(&url, count).await,
        Cmd::Send { addr, text } => send(addr, &text).await,
        Cmd::Resolve { name } => match tokio::net::lookup_host((name.as_str(), 0)).await {
            Ok(addrs) => {
                for a in addrs {
                    println!("{}", a.ip());
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Cmd::Sleep => {
            std::future::pending::<()>().await;
            Ok(())
        }
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
