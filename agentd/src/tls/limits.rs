//! Connection limits of the node API listener, per source address and overall.
//!
//! Why: the node API is open to the network and `Attest` needs no client certificate, so
//! anyone who can reach the port can open connections. Before these limits one source could
//! hold every handshake slot with idle TCP connections (1,500 from one address kept every
//! node from attesting for minutes), and a completed TLS handshake could be kept open for
//! ever. Now:
//!
//! - a source (an IPv4 address, or an IPv6 /64, since one host is handed a whole /64) may
//!   have at most `max_handshakes_per_source` handshakes in progress and
//!   `max_connections_per_source` connections open; a connection beyond either is closed
//!   at once, so the accept loop never waits on one source;
//! - all sources together may hold `max_connections` connections (handshaking or open);
//!   beyond that the accept loop waits (backpressure: the kernel queues new connections).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

/// The listener's limits (`[node_api]` in the server config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open or handshaking at once, from all sources.
    pub max_connections: usize,
    /// Connections open at once from one source (nodes behind one NAT share a source).
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress at once from one source.
    pub max_handshakes_per_source: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 512,
            max_handshakes_per_source: 16,
        }
    }
}

/// The part of a peer address limits are counted by: the IPv4 address, or the /64 of an
/// IPv6 one (an IPv4-mapped IPv6 address counts as its IPv4 address).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    handshakes: usize,
    connections: usize,
}

/// Handshakes and connections per source.
#[derive(Debug, Clone)]
pub struct SourceTable {
    limits: ConnectionLimits,
    counts: Arc<Mutex<HashMap<IpAddr, Counts>>>,
}

/// Why a connection was closed without a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    TooManyHandshakes,
    TooManyConnections,
}

impl SourceTable {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            counts: Arc::default(),
        }
    }

    fn update(&self, source: IpAddr, f: impl FnOnce(&mut Counts)) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let c = map.entry(source).or_default();
        f(c);
        if c.handshakes == 0 && c.connections == 0 {
            map.remove(&source);
        }
    }

    /// A new connection from `ip` starts its handshake, unless its source is at a limit.
    pub fn begin_handshake(&self, ip: IpAddr) -> Result<HandshakeSlot, Refused> {
        let source = source_of(ip);
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let c = map.entry(source).or_default();
        if c.handshakes >= self.limits.max_handshakes_per_source {
            return Err(Refused::TooManyHandshakes);
        }
        if c.handshakes + c.connections >= self.limits.max_connections_per_source {
            return Err(Refused::TooManyConnections);
        }
        c.handshakes += 1;
        Ok(HandshakeSlot {
            table: self.clone(),
            source,
            done: false,
        })
    }

    /// What one source holds now: (handshakes, connections).
    #[cfg(test)]
    fn counts(&self, ip: IpAddr) -> (usize, usize) {
        let map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&source_of(ip))
            .map(|c| (c.handshakes, c.connections))
            .unwrap_or_default()
    }
}

/// A handshake in progress; dropping it frees the slot.
#[derive(Debug)]
pub struct HandshakeSlot {
    table: SourceTable,
    source: IpAddr,
    done: bool,
}

impl HandshakeSlot {
    /// The handshake completed: the connection now counts as open until the returned slot
    /// is dropped. `global` is the connection's share of `max_connections`.
    pub fn connected(mut self, global: OwnedSemaphorePermit) -> ConnectionSlot {
        self.done = true;
        self.table.update(self.source, |c| {
            c.handshakes = c.handshakes.saturating_sub(1);
            c.connections += 1;
        });
        ConnectionSlot {
            table: self.table.clone(),
            source: self.source,
            _global: global,
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if !self.done {
            self.table.update(self.source, |c| {
                c.handshakes = c.handshakes.saturating_sub(1)
            });
        }
    }
}

/// An open connection's place in the limits, freed when the connection is dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    table: SourceTable,
    source: IpAddr,
    _global: OwnedSemaphorePermit,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.table.update(self.source, |c| {
            c.connections = c.connections.saturating_sub(1)
        });
    }
}

/// A connection that holds its [`ConnectionSlot`] for as long as it lives.
#[derive(Debug)]
pub struct Held<S> {
    inner: S,
    _slot: ConnectionSlot,
}

impl<S> Held<S> {
    pub fn new(inner: S, slot: ConnectionSlot) -> Self {
        Self { inner, _slot: slot }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

crate::net::forward_async_write!(Held<S>, S);

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(handshakes: usize, connections: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 100,
            max_connections_per_source: connections,
            max_handshakes_per_source: handshakes,
        }
    }

    fn permit() -> OwnedSemaphorePermit {
        Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap()
    }

    #[test]
    fn handshakes_per_source_are_capped_and_freed() {
        let t = SourceTable::new(limits(2, 10));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let h1 = t.begin_handshake(a).unwrap();
        let _h2 = t.begin_handshake(a).unwrap();
        assert_eq!(
            t.begin_handshake(a).unwrap_err(),
            Refused::TooManyHandshakes
        );
        // Another source is not affected.
        let _hb = t.begin_handshake(b).unwrap();
        drop(h1);
        let h3 = t.begin_handshake(a).unwrap();
        // A completed handshake frees its handshake slot and holds a connection slot.
        let conn = h3.connected(permit());
        assert_eq!(t.counts(a), (1, 1));
        drop(conn);
        assert_eq!(t.counts(a), (1, 0));
    }

    #[test]
    fn connections_per_source_are_capped() {
        let t = SourceTable::new(limits(5, 2));
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let c1 = t.begin_handshake(a).unwrap().connected(permit());
        let _c2 = t.begin_handshake(a).unwrap().connected(permit());
        assert_eq!(
            t.begin_handshake(a).unwrap_err(),
            Refused::TooManyConnections
        );
        drop(c1);
        assert!(t.begin_handshake(a).is_ok());
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let t = SourceTable::new(limits(1, 10));
        let _h = t
            .begin_handshake("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        assert_eq!(
            t.begin_handshake("2001:db8:1:2:ffff::9".parse().unwrap())
                .unwrap_err(),
            Refused::TooManyHandshakes
        );
        assert!(t
            .begin_handshake("2001:db8:1:3::1".parse().unwrap())
            .is_ok());
        assert_eq!(
            source_of("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }
}
