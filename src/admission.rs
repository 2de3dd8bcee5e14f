//! Who may open a connection: caps per client address (open connections, and attempts per
//! second), the client address itself behind trusted proxies, and the count of handshakes in
//! progress.
//!
//! Addresses are counted in 64 shards, each a `Mutex<HashMap>`: an upgrade takes one short lock
//! on its address's shard, and upgrades are rare next to messages. IPv6 clients are counted by
//! their /64, the block one subscriber usually gets, so one host cannot dodge the cap by
//! cycling through addresses of its own prefix. An entry lives while its address has open
//! connections or a bucket still refilling; idle entries are swept when a shard grows, so the
//! map is bounded by the connections open plus the addresses seen in the last few seconds.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use crate::metrics::Refusal;

const SHARDS: usize = 64;
/// A shard is swept of idle entries when it holds this many more than after its last sweep.
const SWEEP_AFTER: usize = 1024;

/// Per-address limits; 0 turns a limit off.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddressLimits {
    /// Open WebSocket connections per client address (IPv6: per /64). Default 0 (off).
    pub max_connections_per_ip: u32,
    /// Upgrade attempts per second per client address, with bursts of twice that.
    /// Default 0 (off).
    pub max_connect_rate_per_ip: u32,
    /// Proxies whose `X-Forwarded-For` is believed. Default none.
    pub trusted_proxies: Vec<Cidr>,
}

/// An address block such as `10.0.0.0/8` or `fd00::/8`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// A block that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an address block like 10.0.0.0/8 or fd00::/8")]
pub struct BadCidr(String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Self, BadCidr> {
        let bad = || BadCidr(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { net, prefix })
    }
}

impl Cidr {
    /// True when `addr` is in the block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.net, canonical(addr)) {
            (IpAddr::V4(net), IpAddr::V4(a)) => prefix_eq(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(a)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                prefix_eq(u128::from(net), u128::from(a), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    };
    a & mask == b & mask
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The key an address is counted under: IPv4 as is, IPv6 by its /64.
fn key(addr: IpAddr) -> IpAddr {
    match canonical(addr) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy (entries left of it could be
/// forged by the client).
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |addr: IpAddr| trusted.iter().any(|cidr| cidr.contains(addr));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(addr) if is_trusted(addr) => client = addr,
            Ok(addr) => return addr,
            Err(_) => return client,
        }
    }
    client
}

#[derive(Debug)]
struct Count {
    open: u32,
    tokens: f64,
    refilled: Instant,
}

/// The node's admission state; cheap to share.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: AddressLimits,
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    handshakes: AtomicUsize,
    max_handshakes: usize,
}

#[derive(Debug, Default)]
struct Shard {
    counts: HashMap<IpAddr, Count>,
    after_sweep: usize,
}

/// One open connection counted against its address; given back on drop.
#[derive(Debug)]
pub(crate) struct AddressSlot {
    /// `None` once handed over.
    admission: Option<Arc<Admission>>,
    key: IpAddr,
}

impl AddressSlot {
    /// Ends this guard without giving the slot back, and returns the key its new holder gives
    /// it back with ([`Admission::give_back`]).
    pub(crate) fn hand_over(mut self) -> IpAddr {
        self.admission = None;
        self.key
    }
}

/// One HTTP connection counted as a handshake in progress; given back on drop.
#[derive(Debug)]
pub(crate) struct Handshake(Arc<Admission>);

impl Admission {
    pub(crate) fn new(limits: AddressLimits, max_handshakes: usize) -> Self {
        Self {
            limits,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            handshakes: AtomicUsize::new(0),
            max_handshakes,
        }
    }

    pub(crate) fn trusted_proxies(&self) -> &[Cidr] {
        &self.limits.trusted_proxies
    }

    /// Counts a new HTTP connection, or refuses it past the handshake cap.
    pub(crate) fn try_handshake(self: &Arc<Self>) -> Option<Handshake> {
        let max = self.max_handshakes;
        self.handshakes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Handshake(Arc::clone(self)))
    }

    /// Admits one upgrade from `client`: charges its attempt rate and takes one of its
    /// connection slots, or says why not.
    pub(crate) fn try_admit(
        self: &Arc<Self>,
        client: IpAddr,
        now: Instant,
    ) -> Result<AddressSlot, Refusal> {
        let (per_ip, rate) = (
            self.limits.max_connections_per_ip,
            self.limits.max_connect_rate_per_ip,
        );
        if per_ip == 0 && rate == 0 {
            return Ok(AddressSlot {
                admission: Some(Arc::clone(self)),
                key: key(client),
            });
        }
        let key = key(client);
        let mut shard = self.shard(key);
        shard.sweep_if_grown(now, rate);
        let burst = f64::from(rate) * 2.0;
        let count = match shard.counts.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Count {
                open: 0,
                tokens: burst,
                refilled: now,
            }),
        };
        if rate > 0 {
            let elapsed = now.saturating_duration_since(count.refilled).as_secs_f64();
            count.tokens = (count.tokens + elapsed * f64::from(rate)).min(burst);
            count.refilled = now;
            if count.tokens < 1.0 {
                return Err(Refusal::RatePerIp);
            }
            count.tokens -= 1.0;
        }
        if per_ip > 0 && count.open >= per_ip {
            return Err(Refusal::PerIp);
        }
        count.open += 1;
        Ok(AddressSlot {
            admission: Some(Arc::clone(self)),
            key,
        })
    }

    fn shard(&self, key: IpAddr) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) as usize % self.shards.len();
        // Every update under this lock is a single field change: a poisoned lock is consistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives back an address slot handed over by [`AddressSlot::hand_over`].
    pub(crate) fn give_back(&self, key: IpAddr) {
        let limits = &self.limits;
        if limits.max_connections_per_ip > 0 || limits.max_connect_rate_per_ip > 0 {
            self.release(key);
        }
    }

    fn release(&self, key: IpAddr) {
        let mut shard = self.shard(key);
        if let Some(count) = shard.counts.get_mut(&key) {
            count.open = count.open.saturating_sub(1);
        }
    }

    /// Addresses tracked now (for tests and `/metrics`).
    pub(crate) fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .counts
                    .len()
            })
            .sum()
    }

    /// HTTP connections not yet upgraded or finished.
    pub(crate) fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Acquire)
    }
}

impl Shard {
    /// Drops entries with no open connection whose bucket is full again, once the shard has
    /// grown by [`SWEEP_AFTER`] since the last sweep: amortized O(1) per admission.
    fn sweep_if_grown(&mut self, now: Instant, rate: u32) {
        if self.counts.len() < self.after_sweep + SWEEP_AFTER {
            return;
        }
        let refill = if rate == 0 { 0.0 } else { 2.0 };
        self.counts.retain(|_, c| {
            c.open > 0 || now.saturating_duration_since(c.refilled).as_secs_f64() < refill
        });
        self.after_sweep = self.counts.len();
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            admission.give_back(self.key);
        }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.0.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admission(per_ip: u32, rate: u32) -> Arc<Admission> {
        Arc::new(Admission::new(
            AddressLimits {
                max_connections_per_ip: per_ip,
                max_connect_rate_per_ip: rate,
                trusted_proxies: Vec::new(),
            },
            10,
        ))
    }

    #[test]
    fn blocks_parse_and_contain() {
        let lan: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(lan.contains("10.1.2.3".parse().unwrap()));
        assert!(lan.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!lan.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "fd00::1".parse().unwrap();
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        let xff = Some("198.51.100.1, 192.0.2.7, 10.0.0.9");
        // The right-most untrusted hop is the client; the left one could be forged.
        assert_eq!(
            client_address(proxy, xff, &trusted),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_address(stranger, xff, &trusted), stranger);
        assert_eq!(client_address(proxy, None, &trusted), proxy);
        assert_eq!(client_address(proxy, Some("junk"), &trusted), proxy);
    }

    #[test]
    fn per_address_cap_counts_ipv6_by_its_64() {
        let admission = admission(2, 0);
        let now = Instant::now();
        let a = admission
            .try_admit("2001:db8::1".parse().unwrap(), now)
            .unwrap();
        let _b = admission
            .try_admit("2001:db8::2".parse().unwrap(), now)
            .unwrap();
        assert_eq!(
            admission
                .try_admit("2001:db8::3".parse().unwrap(), now)
                .unwrap_err(),
            Refusal::PerIp
        );
        assert!(admission
            .try_admit("2001:db9::1".parse().unwrap(), now)
            .is_ok());
        drop(a);
        assert!(admission
            .try_admit("2001:db8::3".parse().unwrap(), now)
            .is_ok());
    }

    #[test]
    fn attempt_rate_allows_a_burst_of_twice_the_rate_then_refills() {
        let admission = admission(0, 2);
        let now = Instant::now();
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        let slots: Vec<_> = (0..4)
            .map(|_| admission.try_admit(client, now).unwrap())
            .collect();
        assert_eq!(
            admission.try_admit(client, now).unwrap_err(),
            Refusal::RatePerIp
        );
        let later = now + Duration::from_millis(500);
        assert!(admission.try_admit(client, later).is_ok());
        drop(slots);
    }

    #[test]
    fn idle_addresses_are_swept_so_the_map_stays_bounded() {
        let admission = admission(0, 1);
        let now = Instant::now();
        let v4 = |base: u32, i: u32| IpAddr::from(std::net::Ipv4Addr::from(base + i));
        for i in 0..5000 {
            drop(admission.try_admit(v4(0x0A00_0000, i), now));
        }
        // Three seconds on, the first 5,000 have full buckets and no connection: the sweeps
        // that the next arrivals set off (each shard grows past SWEEP_AFTER) remove them all.
        let later = now + Duration::from_secs(3);
        let fresh = 2 * (SWEEP_AFTER * SHARDS) as u32;
        for i in 0..fresh {
            drop(admission.try_admit(v4(0x0B00_0000, i), later));
        }
        assert_eq!(admission.tracked(), fresh as usize);
    }

    #[test]
    fn handshakes_are_capped_and_given_back() {
        let admission = admission(0, 0);
        let held: Vec<_> = (0..10)
            .map(|_| admission.try_handshake().unwrap())
            .collect();
        assert!(admission.try_handshake().is_none());
        drop(held);
        assert_eq!(admission.handshakes(), 0);
    }
}
