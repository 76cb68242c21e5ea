//! `labapp dns`: one DNS question over UDP to a chosen server (the system
//! resolver cannot be pointed at one), its A and AAAA answers printed one a
//! line. The message is made and read by hand (RFC 1035 4.1): a header, the
//! question, and the answer records (names compressed or not).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

type Error = Box<dyn std::error::Error>;

/// The query: id 0x6c61, recursion desired, one question of `qtype`, IN.
fn query(name: &str, qtype: u16) -> Vec<u8> {
    let mut m = vec![0x6c, 0x61, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// Skips a (possibly compressed) name at `at`; the offset after it.
fn skip_name(m: &[u8], mut at: usize) -> Result<usize, Error> {
    loop {
        let len = *m.get(at).ok_or("truncated name")?;
        if len & 0xc0 == 0xc0 {
            return Ok(at + 2);
        }
        at += 1 + usize::from(len);
        if len == 0 {
            return Ok(at);
        }
    }
}

fn u16_at(m: &[u8], at: usize) -> Result<u16, Error> {
    Ok(u16::from_be_bytes([
        *m.get(at).ok_or("truncated")?,
        *m.get(at + 1).ok_or("truncated")?,
    ]))
}

/// The A and AAAA addresses of an answer.
fn addresses(m: &[u8]) -> Result<Vec<IpAddr>, Error> {
    let rcode = m.get(3).ok_or("truncated header")? & 0x0f;
    if rcode != 0 {
        return Err(format!("rcode {rcode}").into());
    }
    let answers = u16_at(m, 6)?;
    let mut at = skip_name(m, 12)? + 4;
    let mut out = Vec::new();
    for _ in 0..answers {
        at = skip_name(m, at)?;
        let (rtype, len) = (u16_at(m, at)?, usize::from(u16_at(m, at + 8)?));
        let data = m.get(at + 10..at + 10 + len).ok_or("truncated record")?;
        match (rtype, data.len()) {
            (1, 4) => out.push(IpAddr::V4(Ipv4Addr::new(
                data[0], data[1], data[2], data[3],
            ))),
            (28, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(data);
                out.push(IpAddr::V6(Ipv6Addr::from(b)));
            }
            _ => {}
        }
        at += 10 + len;
    }
    Ok(out)
}

pub async fn ask(server: SocketAddr, name: &str, qtype: &str) -> Result<(), Error> {
    let qtype = match qtype {
        "A" => 1,
        "AAAA" => 28,
        other => return Err(format!("qtype {other}: A or AAAA").into()),
    };
    let local: SocketAddr = if server.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.send_to(&query(name, qtype), server).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .map_err(|_| "no answer within 5 s")??;
    for ip in addresses(&buf[..n])? {
        println!("{ip}");
    }
    Ok(())
}
