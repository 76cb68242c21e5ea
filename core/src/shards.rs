//! Shards: the data path's threads when the runtime is `sharded`.
//!
//! Each shard is one thread running a single-threaded runtime with its own
//! epoll. Every data-path listener is bound once per shard (`SO_REUSEPORT`,
//! so the kernel spreads new connections over them), and a connection
//! stays on the shard that accepted it: its upstream socket, its pooled
//! HBONE connection (the pool is per shard) and its copy all run on that
//! thread. No wake-up crosses to another thread, as it does in the
//! work-stealing runtime when one epoll pass readies more tasks than its
//! thread takes at once (`docs/performance.md`, tenth session). The control
//! plane (xDS, certificates, the node agent, admin, DNS) runs on the
//! process's main thread, a runtime of its own, so a large config push never
//! stalls a shard's traffic (Envoy's main thread and its workers).
//!
//! Without [`start`] (the work-stealing runtime, and tests that start the
//! proxy inside their own runtime) there is one shard: the current runtime.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use tokio::runtime::{Handle, Runtime};
use tracing::warn;

use crate::netns::Netns;

thread_local! {
    /// This thread's shard; 0 off the shards (the control thread, tests).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

static INSTALLED: OnceLock<Shards> = OnceLock::new();

/// The data path's runtimes, by shard index.
#[derive(Clone)]
pub struct Shards {
    handles: Arc<[Handle]>,
    /// The main thread's runtime, when the shards are installed.
    control: Option<Handle>,
}

/// This thread's shard index (0 off the shards).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Starts `n` shards, each a thread of its own, and returns the control
/// runtime for the caller's thread, which it must drive with `block_on`.
/// With a non-zero `busy_poll`, each shard polls its epoll without sleeping
/// for that long after doing work ([`crate::spin`]). The shards are
/// installed for the process; a second call fails.
pub fn start(n: usize, busy_poll: std::time::Duration) -> io::Result<Runtime> {
    let build = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let main = build()?;
    let mut handles = Vec::new();
    for i in 0..n.max(1) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("ztunnel-shard-{i}"))
            .spawn(move || {
                INDEX.with(|c| c.set(i));
                match build() {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        if !busy_poll.is_zero() {
                            rt.spawn(crate::spin::run(busy_poll));
                        }
                        // Drives whatever is spawned here for the life of
                        // the process, which ends from the main thread.
                        rt.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let handle = rx
            .recv()
            .map_err(|_| io::Error::other(format!("shard {i} ended while starting")))??;
        handles.push(handle);
    }
    let shards = Shards {
        handles: handles.into(),
        control: Some(main.handle().clone()),
    };
    INSTALLED
        .set(shards)
        .map_err(|_| io::Error::other("the shards are already started"))?;
    Ok(main)
}

/// The installed shards, or one shard: the current runtime.
///
/// # Panics
/// Outside a runtime when no shards are installed (as `tokio::spawn`).
pub fn current() -> Shards {
    match INSTALLED.get() {
        Some(s) => s.clone(),
        None => Shards {
            handles: vec![Handle::current()].into(),
            control: None,
        },
    }
}

impl Shards {
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runtime threads carrying traffic: the shards, or the work-stealing
    /// runtime's workers.
    pub fn threads(&self) -> usize {
        if self.is_sharded() {
            self.handles.len()
        } else {
            self.handles[0].metrics().num_workers()
        }
    }

    /// Installed by [`start`], rather than the current runtime alone.
    pub fn is_sharded(&self) -> bool {
        self.control.is_some()
    }

    /// Live tasks per shard.
    pub fn shard_tasks(&self) -> Vec<usize> {
        self.handles
            .iter()
            .map(|h| h.metrics().num_alive_tasks())
            .collect()
    }

    /// Live tasks over all shards and the control runtime.
    pub fn alive_tasks(&self) -> usize {
        self.handles
            .iter()
            .chain(&self.control)
            .map(|h| h.metrics().num_alive_tasks())
            .sum()
    }

    /// Binds `addr` once per shard (inside `netns` when given) and serves
    /// each listener on its shard with `serve`; returns the bound address
    /// (port 0 picks one port for all shards). All binds happen before
    /// anything is served, so a port in use fails the whole set (a port of
    /// a SO_REUSEPORT set is in use only to a socket without the option).
    pub fn serve_each<F, Fut>(
        &self,
        addr: SocketAddr,
        netns: Option<&Netns>,
        serve: F,
    ) -> io::Result<SocketAddr>
    where
        F: Fn(tokio::net::TcpListener) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // A pod's listeners are always of a SO_REUSEPORT set: the next
        // ztunnel of a roll binds beside them before this one closes them.
        let shared = self.len() > 1 || netns.is_some();
        let bind = |addr| {
            let b = || bind(addr, shared);
            match netns {
                Some(ns) => ns.run(b).and_then(|r| r),
                None => b(),
            }
        };
        let first = bind(addr)?;
        let bound = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..self.len() {
            listeners.push(bind(bound)?);
        }
        let serve = Arc::new(serve);
        for (handle, l) in self.handles.iter().zip(listeners) {
            let serve = serve.clone();
            // Registered with the shard's own epoll, from the shard.
            handle.spawn(async move {
                match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => serve(l).await,
                    Err(e) => warn!(addr = %bound, error = %e, "listener not served"),
                }
            });
        }
        Ok(bound)
    }
}

/// A non-blocking listener; with `shared`, one of a `SO_REUSEPORT` set.
fn bind(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    // An IPv6 listener takes IPv6 only: IPv4 has listeners of its own, and
    // a v4-mapped peer address would match no workload.
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if shared {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Listeners for `addr` in both families: `addr` itself, and when it is the
/// IPv4 wildcard, the IPv6 wildcard on the same port (an IPv6-only socket:
/// IPv4 peers never appear v4-mapped). A kernel without IPv6 gives the IPv4
/// listener alone; any other failure is an error.
pub fn bind_both_families(addr: SocketAddr) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind(addr, false)?;
    let port = first.local_addr()?.port();
    let mut out = vec![first];
    if addr.ip() == std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        match bind(v6, false) {
            Ok(l) => out.push(l),
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                tracing::debug!(%v6, "no IPv6 in this kernel: IPv4 listener only");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv4_wildcard_is_bound_in_both_families_on_one_port() {
        let ls = bind_both_families("0.0.0.0:0".parse().expect("addr")).expect("binds");
        let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().expect("addr")).collect();
        assert!(addrs[0].is_ipv4());
        // Never a silent pass: where the kernel has IPv6 the twin must be
        // there; a machine without it must say so.
        let Some(v6) = addrs.get(1) else {
            assert!(
                std::net::TcpListener::bind("[::]:0").is_err()
                    && std::env::var_os("MESH_TEST_NO_IPV6").is_some(),
                "no IPv6 listener beside {addrs:?} (set MESH_TEST_NO_IPV6=1 only on a kernel without IPv6)"
            );
            return eprintln!("SKIPPED: no IPv6 in this kernel");
        };
        assert!(v6.is_ipv6() && v6.port() == addrs[0].port());
        // The IPv6 socket takes IPv6 only: IPv4 has its own.
        std::net::TcpStream::connect(("::1", v6.port())).expect("IPv6 connects");
        // A specific address is bound alone.
        let one = bind_both_families("127.0.0.1:0".parse().expect("addr")).expect("binds");
        assert_eq!(one.len(), 1);
    }
}
