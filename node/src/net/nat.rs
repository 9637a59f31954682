//! Reachability behind home routers: what AutoNAT says about us, which
//! relays we know, and where we hold (or want) a relay reservation.
//!
//! The event loop feeds this bookkeeping with libp2p events and asks it which
//! relays to reserve on; it does no I/O itself, so its rules are unit-tested
//! without a network. A node AutoNAT finds unreachable reserves a slot on up
//! to [`MAX_RESERVATIONS`] relays, so peers behind other routers can reach it
//! through a relay; DCUtR then tries to upgrade those relayed connections to
//! direct ones, and the event loop closes a relayed connection as soon as a
//! direct one to the same peer is open, so tensors take a relay only while no
//! direct path exists.

use libp2p::{
    core::transport::ListenerId, multiaddr::Protocol, relay, Multiaddr, PeerId, StreamProtocol,
};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Relays a node behind a NAT reserves on at once: one more than needed, so
/// losing a relay does not cut the node off while it finds another.
pub const MAX_RESERVATIONS: usize = 2;

/// How long a relay that refused (or ended) a reservation comes after the
/// other relays, doubling with each refusal up to [`MAX_REFUSED_BACKOFF`]:
/// a relay that serves only its own swarm, or is full, refuses every time,
/// and asking it first again would keep the node on it for good. With no
/// other relay to ask it is still asked (a refusal may be passing: a relay
/// of our swarm refuses until it has admitted us).
const REFUSED_BACKOFF: Duration = Duration::from_secs(30);
/// The longest a refusing relay comes last.
const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(300);
/// Refusing relays remembered at once.
const MAX_REFUSING: usize = 256;

/// What AutoNAT last concluded about this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// No probe has answered yet.
    #[default]
    Unknown,
    /// Peers could dial us back: others can connect to us directly.
    Public,
    /// Dial-backs failed: we are behind a NAT or firewall and need a relay.
    Private,
}

/// The relay bookkeeping of one node.
#[derive(Debug, Default)]
pub struct RelayState {
    reachability: Reachability,
    /// Relays we are directly connected to, with the address we reach them at.
    relays: HashMap<PeerId, Multiaddr>,
    /// Reservations asked for or held: relay → the circuit listener.
    reservations: HashMap<PeerId, ListenerId>,
    /// Relays whose last reservation failed: refusals in a row, and until
    /// when they are passed over.
    refusing: HashMap<PeerId, (u32, Instant)>,
}

impl RelayState {
    /// AutoNAT's latest verdict.
    pub fn reachability(&self) -> Reachability {
        self.reachability
    }

    /// Records AutoNAT's verdict; a node found public drops its reservations'
    /// bookkeeping (the listeners are closed by the caller).
    pub fn set_reachability(&mut self, r: Reachability) -> Vec<ListenerId> {
        self.reachability = r;
        if r == Reachability::Public {
            self.reservations.drain().map(|(_, id)| id).collect()
        } else {
            Vec::new()
        }
    }

    /// A peer told us (by identify) that it serves as a relay, and we reach it
    /// at `addr`. Relayed addresses are not kept: a relay behind a relay is
    /// no help.
    pub fn relay_seen(&mut self, peer: PeerId, addr: Multiaddr) {
        if !is_relayed(&addr) {
            self.relays.insert(peer, strip_peer(addr));
        }
    }

    /// Every connection to `peer` closed: it is no relay of ours any more
    /// (should it come back, its refusals are forgotten).
    pub fn peer_gone(&mut self, peer: &PeerId) {
        self.relays.remove(peer);
        self.refusing.remove(peer);
    }

    /// The circuit listeners to open at `now`: `(relay, address to listen
    /// on)`, while we are private and hold fewer than [`MAX_RESERVATIONS`].
    /// Relays that are members of our swarm (`is_member`) come first (a
    /// relay of another swarm serves only its own), and relays that refused
    /// lately come last.
    pub fn wanted(
        &self,
        now: Instant,
        is_member: impl Fn(&PeerId) -> bool,
    ) -> Vec<(PeerId, Multiaddr)> {
        if self.reachability != Reachability::Private {
            return Vec::new();
        }
        let room = MAX_RESERVATIONS.saturating_sub(self.reservations.len());
        let mut candidates: Vec<_> = self
            .relays
            .iter()
            .filter(|(peer, _)| !self.reservations.contains_key(peer))
            .collect();
        let refused_lately = |peer: &PeerId| {
            self.refusing
                .get(peer)
                .is_some_and(|(_, until)| now < *until)
        };
        // Deterministic choice, so tests and logs are reproducible.
        candidates.sort_by_key(|(peer, _)| (refused_lately(peer), !is_member(peer), **peer));
        candidates
            .into_iter()
            .take(room)
            .map(|(peer, addr)| (*peer, circuit_listen_addr(addr, *peer)))
            .collect()
    }

    /// A circuit listener on `relay` was opened.
    pub fn reserving(&mut self, relay: PeerId, listener: ListenerId) {
        self.reservations.insert(relay, listener);
    }

    /// A listener closed at `now` (the relay refused, expired or left;
    /// `failed` unless it closed cleanly): the slot is free to take another
    /// relay, and a relay that failed is passed over for a while (see
    /// [`REFUSED_BACKOFF`]). Returns the relay.
    pub fn listener_closed(
        &mut self,
        listener: ListenerId,
        failed: bool,
        now: Instant,
    ) -> Option<PeerId> {
        let relay = self
            .reservations
            .iter()
            .find(|(_, id)| **id == listener)
            .map(|(peer, _)| *peer)?;
        self.reservations.remove(&relay);
        if failed {
            if self.refusing.len() >= MAX_REFUSING {
                self.refusing.retain(|_, (_, until)| *until > now);
            }
            if self.refusing.len() < MAX_REFUSING || self.refusing.contains_key(&relay) {
                let times = self.refusing.get(&relay).map_or(0, |(t, _)| *t);
                let backoff = REFUSED_BACKOFF
                    .saturating_mul(1 << times.min(16))
                    .min(MAX_REFUSED_BACKOFF);
                self.refusing
                    .insert(relay, (times.saturating_add(1), now + backoff));
            }
        }
        Some(relay)
    }

    /// `relay` accepted our reservation, or became a member of our swarm
    /// (one that refused us before it had admitted us accepts now): its
    /// earlier refusals are forgotten.
    pub fn forget_refusals(&mut self, relay: &PeerId) {
        self.refusing.remove(relay);
    }

    /// Relays we hold or are asking for a reservation on.
    pub fn reserved_on(&self) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self.reservations.keys().copied().collect();
        v.sort();
        v
    }
}

/// The address that asks `relay` (reached at `addr`) for a reservation.
pub fn circuit_listen_addr(addr: &Multiaddr, relay: PeerId) -> Multiaddr {
    strip_peer(addr.clone())
        .with(Protocol::P2p(relay))
        .with(Protocol::P2pCircuit)
}

/// Whether `addr` goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Whether `addr` is on the loopback interface (useless to other machines).
pub fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// The listen addresses a peer announced that are worth keeping and handing
/// on to others through the DHT. A peer's loopback addresses reach it only
/// from its own machine: kept when we reach it over loopback ourselves (a
/// local testnet), dropped otherwise, since to anyone else they name their
/// own machine, often their own socket.
/// At most [`MAX_SHARED_ADDRESSES`], duplicates dropped: a peer may announce
/// as many as it likes, and each one kept grows its routing-table entry.
pub fn addresses_to_share(announced: Vec<Multiaddr>, via_loopback: bool) -> Vec<Multiaddr> {
    let mut kept: Vec<Multiaddr> = Vec::new();
    for a in announced {
        if kept.len() == MAX_SHARED_ADDRESSES {
            break;
        }
        if (via_loopback || !is_loopback(&a)) && !kept.contains(&a) {
            kept.push(a);
        }
    }
    kept
}

/// Addresses of one peer kept for the DHT: a machine listens on a few
/// interfaces, each over a relay or two.
pub const MAX_SHARED_ADDRESSES: usize = 16;

/// The addresses handed to the DHT per peer, so that a peer announcing new
/// ones replaces its old ones there instead of adding to them.
#[derive(Debug, Default)]
pub struct SharedAddresses(HashMap<PeerId, Vec<Multiaddr>>);

/// Peers whose shared addresses [`SharedAddresses`] remembers; past it one is
/// forgotten (its addresses stay in the DHT until it drops the peer).
const MAX_REMEMBERED_PEERS: usize = 4096;

impl SharedAddresses {
    /// Records `now` as `peer`'s shared addresses; returns those shared
    /// before that it no longer announces, for the caller to remove.
    pub fn replace(&mut self, peer: PeerId, now: Vec<Multiaddr>) -> Vec<Multiaddr> {
        if self.0.len() >= MAX_REMEMBERED_PEERS && !self.0.contains_key(&peer) {
            if let Some(forgotten) = self.0.keys().next().copied() {
                self.0.remove(&forgotten);
            }
        }
        let before = self.0.insert(peer, now).unwrap_or_default();
        let now = &self.0[&peer];
        before.into_iter().filter(|a| !now.contains(a)).collect()
    }
}

/// Whether a peer's identify protocols say it relays for others.
pub fn serves_relay(protocols: &[StreamProtocol]) -> bool {
    protocols.contains(&relay::HOP_PROTOCOL_NAME)
}

/// `addr` without its trailing `/p2p/…` parts, as listen addresses are written.
pub(super) fn strip_peer(mut addr: Multiaddr) -> Multiaddr {
    while matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// A relay serves the members of its swarm only (the peers the event loop
/// counts as members), so a public `--relay` node is not an open relay for
/// the whole internet.
#[derive(Clone, Default)]
pub struct MembersOnly(Arc<Mutex<HashSet<PeerId>>>);

impl MembersOnly {
    /// `peer` became a member.
    pub fn insert(&self, peer: PeerId) {
        self.set().insert(peer);
    }

    /// `peer` left.
    pub fn remove(&self, peer: &PeerId) {
        self.set().remove(peer);
    }

    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<PeerId>> {
        // One insert or remove per holder: consistent even after a panic.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl relay::RateLimiter for MembersOnly {
    fn try_next(&mut self, peer: PeerId, _addr: &Multiaddr, _now: std::time::Instant) -> bool {
        self.set().contains(&peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_private_node_reserves_on_known_relays_up_to_the_limit() {
        let mut s = RelayState::default();
        let relays: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        for (i, r) in relays.iter().enumerate() {
            s.relay_seen(
                *r,
                addr(&format!("/ip4/10.0.0.{i}/udp/4001/quic-v1/p2p/{r}")),
            );
        }
        let now = Instant::now();
        let no_members = |_: &PeerId| false;
        assert!(
            s.wanted(now, no_members).is_empty(),
            "unknown reachability reserves nothing"
        );
        s.set_reachability(Reachability::Private);
        let wanted = s.wanted(now, no_members);
        assert_eq!(wanted.len(), MAX_RESERVATIONS);
        for (relay, a) in &wanted {
            assert!(is_relayed(a));
            assert!(
                a.to_string()
                    .ends_with(&format!("/p2p/{relay}/p2p-circuit")),
                "{a}"
            );
            // The relay's own /p2p part appears once.
            assert_eq!(a.to_string().matches("/p2p/").count(), 1, "{a}");
        }
        let mut ids = Vec::new();
        for (relay, _) in &wanted {
            let id = ListenerId::next();
            s.reserving(*relay, id);
            ids.push(id);
        }
        assert!(
            s.wanted(now, no_members).is_empty(),
            "full: nothing more to ask"
        );
        // An expired reservation frees its slot for the third relay.
        assert_eq!(s.listener_closed(ids[0], false, now), Some(wanted[0].0));
        let next = s.wanted(now, no_members);
        assert_eq!(next.len(), 1);
        assert!(!s.reserved_on().contains(&next[0].0));
    }

    #[test]
    fn a_refusing_relay_is_passed_over_and_members_come_first() {
        let mut s = RelayState::default();
        let mut relays: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        relays.sort();
        for (i, r) in relays.iter().enumerate() {
            s.relay_seen(*r, addr(&format!("/ip4/10.0.0.{i}/udp/4001/quic-v1")));
        }
        s.set_reachability(Reachability::Private);
        let now = Instant::now();
        let chosen = |s: &RelayState, at: Instant, member: Option<PeerId>| {
            s.wanted(at, |p| Some(*p) == member)
                .into_iter()
                .map(|(r, _)| r)
                .collect::<Vec<_>>()
        };
        assert_eq!(chosen(&s, now, None), relays[..2]);
        // The member relay first, whatever its id.
        assert_eq!(chosen(&s, now, Some(relays[2])), [relays[2], relays[0]]);
        // The lowest refuses: the next ask goes to the third, not to it again.
        let (first, second) = (ListenerId::next(), ListenerId::next());
        s.reserving(relays[0], first);
        s.reserving(relays[1], second);
        assert_eq!(s.listener_closed(first, true, now), Some(relays[0]));
        assert_eq!(chosen(&s, now, None), [relays[2]]);
        // After its backoff it is first again; refusing again doubles it.
        assert_eq!(chosen(&s, now + REFUSED_BACKOFF, None), [relays[0]]);
        let again = ListenerId::next();
        s.reserving(relays[0], again);
        s.listener_closed(again, true, now + REFUSED_BACKOFF);
        let later = now + REFUSED_BACKOFF * 2;
        assert_eq!(chosen(&s, later, None), [relays[2]]);
        assert_eq!(chosen(&s, now + REFUSED_BACKOFF * 3, None), [relays[0]]);
        // With no other relay to ask, it is asked all the same.
        s.peer_gone(&relays[2]);
        assert_eq!(chosen(&s, later, None), [relays[0]]);
        // Once it accepts (or joins our swarm), its refusals are forgotten,
        // as are those of a relay that left and came back.
        s.relay_seen(relays[2], addr("/ip4/10.0.0.2/udp/4001/quic-v1"));
        s.forget_refusals(&relays[0]);
        assert_eq!(chosen(&s, later, None), [relays[0]]);
    }

    #[test]
    fn a_public_node_drops_its_reservations_and_relayed_addresses_are_no_relays() {
        let mut s = RelayState::default();
        let r = PeerId::random();
        s.relay_seen(
            PeerId::random(),
            addr(&format!("/ip4/10.0.0.9/udp/1/quic-v1/p2p/{r}/p2p-circuit")),
        );
        s.set_reachability(Reachability::Private);
        let now = Instant::now();
        assert!(
            s.wanted(now, |_| false).is_empty(),
            "a relay reached through a relay is no help"
        );
        s.relay_seen(r, addr("/ip4/10.0.0.1/udp/4001/quic-v1"));
        let id = ListenerId::next();
        s.reserving(r, id);
        assert_eq!(s.set_reachability(Reachability::Public), vec![id]);
        assert!(s.reserved_on().is_empty());
        assert!(s.wanted(now, |_| false).is_empty());
        s.peer_gone(&r);
        s.set_reachability(Reachability::Private);
        assert!(
            s.wanted(now, |_| false).is_empty(),
            "a departed relay is not asked"
        );
    }

    #[test]
    fn only_members_may_use_the_relay() {
        use libp2p::relay::RateLimiter;
        let members = MembersOnly::default();
        let mut limiter = members.clone();
        let (a, b) = (PeerId::random(), PeerId::random());
        members.insert(a);
        let at = addr("/ip4/10.0.0.1/udp/1/quic-v1");
        let now = std::time::Instant::now();
        assert!(limiter.try_next(a, &at, now));
        assert!(!limiter.try_next(b, &at, now));
        members.remove(&a);
        assert!(!limiter.try_next(a, &at, now));
    }

    #[test]
    fn loopback_addresses_are_told_apart() {
        assert!(is_loopback(&addr("/ip4/127.0.0.1/udp/1/quic-v1")));
        assert!(is_loopback(&addr("/ip6/::1/udp/1/quic-v1")));
        assert!(!is_loopback(&addr("/ip4/10.77.0.1/udp/1/quic-v1")));
    }

    #[test]
    fn loopback_addresses_are_shared_only_among_loopback_peers() {
        let announced = vec![
            addr("/ip4/127.0.0.1/udp/4001/quic-v1"),
            addr("/ip6/::1/udp/4001/quic-v1"),
            addr("/ip4/192.168.1.2/udp/4001/quic-v1"),
            addr("/ip4/10.77.0.1/udp/4001/quic-v1/p2p-circuit"),
        ];
        assert_eq!(
            addresses_to_share(announced.clone(), false),
            announced[2..].to_vec()
        );
        assert_eq!(addresses_to_share(announced.clone(), true), announced);
    }

    #[test]
    fn a_peer_announcing_ever_more_addresses_keeps_a_bounded_few() {
        let many: Vec<Multiaddr> = (0..1000u32)
            .map(|i| {
                addr(&format!(
                    "/ip4/10.0.{}.{}/udp/4001/quic-v1",
                    i / 250,
                    i % 250
                ))
            })
            .collect();
        let first = addresses_to_share(many.clone(), false);
        assert_eq!(first, many[..MAX_SHARED_ADDRESSES].to_vec());
        // Repeats count once.
        let repeated = vec![many[0].clone(); 40];
        assert_eq!(addresses_to_share(repeated, false), many[..1].to_vec());
        // A new announcement replaces the old addresses rather than adding.
        let mut shared = SharedAddresses::default();
        let peer = PeerId::random();
        assert!(shared.replace(peer, first.clone()).is_empty());
        let second = addresses_to_share(many[10..].to_vec(), false);
        let stale = shared.replace(peer, second);
        assert_eq!(stale, many[..10].to_vec());
        // Other peers' are their own.
        assert!(shared.replace(PeerId::random(), first).is_empty());
    }

    #[test]
    fn hop_protocol_marks_a_relay() {
        assert!(serves_relay(&[
            StreamProtocol::new("/ipfs/id/1.0.0"),
            relay::HOP_PROTOCOL_NAME
        ]));
        assert!(!serves_relay(&[StreamProtocol::new("/ipfs/id/1.0.0")]));
    }
}
