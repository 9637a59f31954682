//! One averaging round per call: leader-based matchmaking, then a butterfly all-reduce.
//!
//! [`Averager`] is a sans-IO state machine driven like quinn-proto's `Connection`: feed it
//! [`Averager::start_round`], [`Averager::handle_message`] and [`Averager::handle_timeout`];
//! drain [`Averager::poll_transmit`] and [`Averager::poll_event`]; call `handle_timeout` at
//! [`Averager::poll_timeout`]. Time is the caller's `now` (any monotonic origin).
//!
//! # Matchmaking
//! - `start_round` broadcasts `Join{round, len}` and re-broadcasts it every `retry_interval`
//!   while matchmaking. `Join`s for rounds we have not started are buffered (at most
//!   [`MAX_ROUNDS_AHEAD`] rounds past our current one, [`MAX_BUFFERED_ROUNDS`] rounds,
//!   [`MAX_GROUP_MEMBERS`] senders each; beyond that they are dropped with a `Rejected`).
//! - The leader is the smallest id among us and the senders of `Join` for this round with
//!   the same `len` (a different `len` is `Rejected`).
//! - The leader closes the group when every peer of the live view ([`Averager::set_peers`])
//!   has joined, or at start + its join window, whichever comes first: members are the sorted
//!   joiners plus itself, truncated to `max_group_size` (smallest ids kept, so the leader
//!   stays), and it broadcasts `Group`. A `Join` for a round whose group we led and closed is
//!   answered with that `Group` (to that peer), so lost `Group`s heal and latecomers learn
//!   they are out.
//! - Every `Join` carries its sender's proof of joining that round with that length
//!   ([`join_proof`]; the caller's [`JoinAttestor`] makes and checks them), and one without
//!   a valid proof is `Rejected`. The leader's `Group` carries the proof of each member, and
//!   a member checks those of the peers whose `Join` did not reach it: a `Group` listing a
//!   member it cannot verify (made up by a hostile leader), or without its leader's
//!   signature, is `Rejected`, and its leader is set aside for the round, so the others
//!   regroup without it at once, and sits out the next rounds as a twice-struck staller
//!   does ([`sitout`]).
//! - The leader signs its `Group`. A member reducing a round that gets a `Join` for it
//!   from a member it has heard nothing from passes the `Group` it followed on to that
//!   member, whose leader's copy was lost or withheld.
//! - A non-leader follows the first `Group` for its round that lists it, accepted from its
//!   leader (`members[0]` is the sender) or passed on by a member it lists, with the
//!   leader's valid signature; otherwise `Rejected`. A `Group` for the
//!   round that does not list us sets its members aside for the round: we regroup with
//!   the peers left (a new leader among them closes when all of them in its view have
//!   joined, so peers left out of a full group, or by a hostile leader, still average
//!   together). With nobody left we lead ourselves and finish at once. No `Group` by
//!   start + its group wait finishes the round alone: values unchanged, group `[me]`,
//!   nothing averaged. A leader whose group is just itself still broadcasts it (waiting
//!   peers learn they are out), emits `GroupFormed` and finishes at once with the same
//!   solo outcome.
//! - A peer is in one round at a time, so a `Join` for a later round shows its sender is
//!   past ours: its buffered `Join`s for earlier rounds are dropped (a late copy of one is
//!   ignored), and the round we start or are matchmaking sets it aside like a peer taken
//!   by another group (not counted, not waited for, not followed as leader).
//! - A peer that stalled our recent rounds (dropped at the deadline from two of them
//!   without a complete round between) sits out the next ones, for ever longer
//!   ([`sitout`]): its `Join` is not counted, the leader does not wait for it, and a
//!   `Group` it sends is `Rejected`. Members excluded for invalid data, or whose reduced
//!   part we refused, cost no waiting and earn no strike.
//! - The join window is `join_window` and the group wait `join_window + group_timeout`;
//!   with `adaptive_deadline` both are fitted to the rounds measured so far (see
//!   [`deadline`]), with those as ceilings.
//!
//! # All-reduce in a group of n members (ascending ids)
//! - The vector is cut with [`split_ranges`](crate::tensor::split_ranges)`(len, p)` into
//!   `p =` [`AveragingConfig::part_count`] parts: n for short vectors, a multiple of n when a
//!   member's share is longer than `part_values`. Member `j mod n` reduces part j. Each
//!   member sends `Part{j}` (its values of range j) to part j's reducer, in part order, and
//!   keeps the parts it reduces as its own contribution, re-sending every `retry_interval`
//!   until that part's `Reduced` arrives (the ack) or the reduce deadline (formation +
//!   `reduce_timeout`) passes.
//! - A reducer finishes each of its parts when all n contributions are in (so early parts
//!   travel back while later ones still arrive), or at formation + 3/4 of
//!   `reduce_timeout` (so the result still has time to travel): the mean over the
//!   contributions received (as decoded), summed in f64 in member order, divided, cast to
//!   f32. It sends `Reduced{j, contributors, mean}` to every other member and answers any
//!   later `Part` for j (also after the round, for the last finished round) with it again.
//! - A member finishes when it has every part's result, or at the reduce deadline; parts it
//!   never got keep its local values (`averaged = false`). Members missing from contributors,
//!   and reducers that never answered, are listed in `dropped`.
//! - A member that joins a later round (or had joined one when our group formed) without
//!   having sent us a `Part` or `Reduced` of this one most likely finished it without us
//!   (alone, or in a group that left us out): the round stops waiting for its
//!   contributions at once and for its `Reduced` parts a grace later: a quarter of the
//!   reduce deadline the next round uses (once fitted, the slowest all-reduce measured,
//!   at least 1.25 s), at most `retry_interval` (its `Join` may have overtaken them after
//!   our reducer deadline reduced without its lost `Part`); parts still missing then stay
//!   local, and it earns a strike as a member dropped at the deadline does. A member we
//!   heard from keeps its place.
//! - A member outside our live view ([`Averager::set_peers`]) cannot be reached: the
//!   round neither waits for its contributions nor for the parts it reduces, which stay
//!   local (it is listed in `dropped`, without a strike).
//! - Exactly one `Finished` per started round; afterwards [`Averager::in_flight`] is `None`.
//!
//! # Compression
//! `Part`s and `Reduced` are encoded with [`AveragingConfig::compression`] (f32 by default;
//! f16, bf16 or blockwise int8 to cut traffic 2–4x). Values are then quantised twice: each
//! contribution when its member sends it (the reducer's own contribution never crosses the
//! wire and counts at full precision), and the mean when the reducer encodes it (the reducer
//! keeps the decoded mean, so the whole group still ends with identical values). With f32
//! both steps are exact and the result is bit for bit the mean above. Top-k is refused by
//! [`AveragingConfig::validate`] and, if configured anyway, replaced by f32: a sparse
//! payload would average every dropped parameter as zero. Received payloads may use any
//! dense encoding; a top-k one is `Rejected`.
//!
//! Sparse pseudo-gradients are the exception ([`AveragingConfig::sparse`]): a caller that
//! sparsifies its values with [`ErrorFeedback::sparsify`](crate::tensor::ErrorFeedback::sparsify)
//! (what it drops is sent in later rounds) has each part, and each reduced part, travel as
//! exact `(index, value)` entries of its nonzero values whenever that is smaller than the
//! dense encoding, and accepts such payloads from others. Zeros are then real zeros, and
//! the mean is exact.
//!
//! # Validation
//! Messages are checked before use and never cause a panic: structurally invalid content,
//! messages from non-members, wrong lengths, part indices out of range, payloads whose
//! encoding, length, digest or content is wrong, and `Group`s not sent by their leader are
//! refused with a `Rejected` event. (A `Rejected` is not proof of malice: when two leaders race,
//! members of the other group may send us `Part`s as "non-member".) Duplicates (the first
//! contribution wins) and messages for old rounds (except the `Part` re-ack above) are
//! ignored. `Part`s that overtake our `Group` are held, within bounds (see `early`), and
//! replayed once the group forms; those past the bounds are dropped, and the sender
//! re-sends them.

mod allreduce;
mod config;
pub mod deadline;
mod early;
pub mod join_proof;
mod matchmaking;
mod messages;
mod outcome;
mod robust;
pub mod sitout;
#[cfg(test)]
mod tests;

pub use config::{
    AveragingConfig, AveragingConfigError, DEFAULT_PART_VALUES, MAX_BUFFERED_ROUNDS,
    MAX_GROUP_MEMBERS, MAX_ROUNDS_AHEAD, MAX_VECTOR_LEN,
};
pub use join_proof::{JoinAttestor, OpenJoinProofs, MAX_JOIN_PROOF_BYTES};
pub use messages::AvgMessage;
pub use outcome::{AveragingError, AvgEvent, Destination, PartOutcome, RoundOutcome, Transmit};
pub use robust::Aggregation;

use crate::tensor::{Bytes, Payload};
use crate::NodeId;
use allreduce::{AllReduce, LastReduced};
use matchmaking::{JoinBuffer, Joined, Matchmaking, Waits};
use outcome::{solo_outcome, Outbox, Pending};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Where the round in flight stands.
#[derive(Debug)]
enum State {
    Idle,
    Matchmaking(Box<Matchmaking>),
    Reducing(Box<AllReduce>),
}

/// The `Group` we most recently led, re-sent to peers whose `Join` shows they missed it.
#[derive(Debug)]
struct LedGroup {
    round: u64,
    msg: AvgMessage,
    /// When each peer was last sent `msg` again: a `Join` costs its sender
    /// ~150 bytes and the `Group` ~130 per member, so answering every one
    /// would let any peer multiply its upload through ours.
    resent: BTreeMap<NodeId, Duration>,
}

/// Whether `peer` may be sent an answer again at `now`, at most once per
/// `every` (recorded in `sent` if so): a peer repeating a cheap request must
/// not turn it into as many answers from us.
fn answer_again(
    sent: &mut BTreeMap<NodeId, Duration>,
    peer: NodeId,
    now: Duration,
    every: Duration,
) -> bool {
    if sent
        .get(&peer)
        .is_some_and(|&t| now < t.saturating_add(every))
    {
        return false;
    }
    sent.insert(peer, now);
    true
}

/// One peer's averaging state machine. See the module docs for the protocol.
#[derive(Debug)]
pub struct Averager {
    me: NodeId,
    config: AveragingConfig,
    peers: BTreeSet<NodeId>,
    state: State,
    last_finished: Option<u64>,
    joins: JoinBuffer,
    led: Option<LedGroup>,
    last_reduced: Option<LastReduced>,
    out: Outbox,
    /// Latest `now` seen, for the immediate timeout `set_peers` asks for.
    last_now: Duration,
    /// `set_peers` changed the view during matchmaking: re-check whether to close.
    recheck: bool,
    /// `Part`s for our matchmaking round that overtook the `Group` message
    /// (gossip and direct streams are not ordered): replayed once the group
    /// forms instead of waiting for the sender's retransmit.
    early_parts: early::EarlyParts,
    /// The reference of the round in matchmaking (see [`Averager::start_round_around`]).
    reference: Option<Vec<f32>>,
    /// The reduce deadline fitted to measured rounds, when `config.adaptive_deadline`.
    deadline: deadline::ReduceDeadline,
    /// The join window and the wait for a `Group`, fitted likewise.
    matchmaking_deadlines: deadline::MatchmakingDeadlines,
    /// Members that stalled our rounds, and which rounds they sit out.
    sit_outs: sitout::SitOuts,
    /// When the all-reduce in flight began.
    reduce_started: Duration,
    /// Makes our join proofs and checks everyone else's.
    attestor: Box<dyn JoinAttestor>,
    /// The signed `Group` of the round in flight that another leader formed and we
    /// followed: passed on to a member still asking to join (see `join_proof`).
    followed: Option<AvgMessage>,
    /// When we last passed that `Group` on to each member still asking to join.
    passed_on: BTreeMap<NodeId, Duration>,
    /// Peers of the round in flight that sent us a `Part` although our
    /// `Group` does not list them, and were sent that `Group` (once each).
    shown_our_group: BTreeSet<NodeId>,
    /// The leader of the round in flight, once it proved to have signed two
    /// different `Group`s for it: members that stalled the round were
    /// following the other one and are not to blame.
    equivocated: Option<NodeId>,
}

impl Averager {
    /// Creates the state machine for peer `me`, whose join proofs `attestor` makes and
    /// checks. Call [`Averager::set_peers`] before the first round: with an empty view a
    /// round closes at once, alone.
    pub fn new(me: NodeId, config: AveragingConfig, attestor: Box<dyn JoinAttestor>) -> Self {
        Averager {
            me,
            peers: BTreeSet::new(),
            state: State::Idle,
            last_finished: None,
            joins: JoinBuffer::default(),
            led: None,
            last_reduced: None,
            out: Outbox::default(),
            last_now: Duration::ZERO,
            recheck: false,
            early_parts: early::EarlyParts::default(),
            reference: None,
            deadline: deadline::ReduceDeadline::new(config.reduce_timeout),
            matchmaking_deadlines: deadline::MatchmakingDeadlines::new(
                config.join_window,
                config.group_timeout,
            ),
            sit_outs: sitout::SitOuts::default(),
            reduce_started: Duration::ZERO,
            attestor,
            followed: None,
            passed_on: BTreeMap::new(),
            shown_our_group: BTreeSet::new(),
            equivocated: None,
            config,
        }
    }

    /// How long a round waits for the reduced parts of a member that moved
    /// on without a word (see `AllReduce::moved_on`): long enough for a
    /// `Reduced` its `Join` overtook. That travels no longer than a whole
    /// all-reduce, so a quarter of the reduce deadline (once fitted, the
    /// slowest all-reduce measured, at least 1.25 s), and never longer than
    /// `retry_interval`.
    fn moved_on_grace(&self) -> Duration {
        let slowest = self.reduce_deadline() / deadline::FACTOR;
        self.config.retry().min(slowest)
    }

    /// The all-reduce deadline the next round uses: the configured one, or
    /// with `adaptive_deadline` the one fitted to the rounds measured so far.
    pub fn reduce_deadline(&self) -> Duration {
        if self.config.adaptive_deadline {
            self.deadline.current()
        } else {
            self.config.reduce_timeout
        }
    }

    /// How long the next round's leader waits for the rest of its live view
    /// (and, plus [`Averager::group_wait`]'s margin, a member for the
    /// `Group`): the configured `join_window`, or with `adaptive_deadline`
    /// the window fitted to how late peers joined in rounds they all did.
    pub fn join_window(&self) -> Duration {
        self.waits().join_window
    }

    /// How long after its start the next round waits for its leader's
    /// `Group` before finishing alone: `join_window + group_timeout`, or
    /// fitted with `adaptive_deadline`.
    pub fn group_wait(&self) -> Duration {
        self.waits().group_wait
    }

    fn waits(&self) -> Waits {
        if self.config.adaptive_deadline {
            Waits {
                join_window: self.matchmaking_deadlines.join_window(),
                group_wait: self.matchmaking_deadlines.group_wait(),
            }
        } else {
            Waits {
                join_window: self.config.join_window,
                group_wait: self
                    .config
                    .join_window
                    .saturating_add(self.config.group_timeout),
            }
        }
    }

    /// The peers of our view that sit out `round` for stalling earlier
    /// rounds (see [`sitout`]): not counted, not waited for, not followed.
    pub fn sitting_out(&self, round: u64) -> Vec<NodeId> {
        self.peers
            .iter()
            .copied()
            .filter(|p| self.sit_outs.sits_out(*p, round))
            .collect()
    }

    /// The live view less the peers that sit out `round`: whom a leader waits for.
    fn expected_peers(&self, round: u64) -> BTreeSet<NodeId> {
        self.peers
            .iter()
            .copied()
            .filter(|p| !self.sit_outs.sits_out(*p, round))
            .collect()
    }

    /// Our id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The configuration in use.
    pub fn config(&self) -> &AveragingConfig {
        &self.config
    }

    /// Replaces the live peer view (ours is ignored if present). A leader closes early once
    /// all of them have joined; a change during matchmaking is re-checked at the next
    /// timeout, which [`Averager::poll_timeout`] makes immediate. Members of the group
    /// in flight that left the view are no longer waited for: their parts stay local.
    /// One that had kept the round waiting earns its strike all the same.
    pub fn set_peers(&mut self, peers: &[NodeId]) {
        self.peers = peers.iter().copied().filter(|p| *p != self.me).collect();
        match &mut self.state {
            State::Matchmaking(_) => self.recheck = true,
            State::Reducing(ar) => {
                let gone: Vec<NodeId> = ar
                    .group()
                    .iter()
                    .filter(|m| **m != self.me && !self.peers.contains(m))
                    .copied()
                    .collect();
                if !gone.is_empty() {
                    for member in gone {
                        ar.depart(member, &mut self.out);
                    }
                    // The round may be complete now: the next timeout sees to it.
                    self.recheck = true;
                }
            }
            State::Idle => {}
        }
    }

    /// The round in progress, if any.
    pub fn in_flight(&self) -> Option<u64> {
        match &self.state {
            State::Idle => None,
            State::Matchmaking(mm) => Some(mm.round),
            State::Reducing(ar) => Some(ar.round()),
        }
    }

    /// The last round that finished, if any.
    pub fn last_finished(&self) -> Option<u64> {
        self.last_finished
    }

    /// Starts averaging `values` in `round`: broadcasts `Join` and begins matchmaking.
    /// Refuses while a round is in flight, for a round not after the last finished one, and
    /// for vectors that are too long or hold NaN/inf.
    pub fn start_round(
        &mut self,
        now: Duration,
        round: u64,
        values: Vec<f32>,
    ) -> Result<(), AveragingError> {
        self.start_round_around(now, round, values, None)
    }

    /// [`Averager::start_round`] for values that are offsets from a shared
    /// `reference` (DiLoCo's pseudo-gradients `reference - params`): robust
    /// aggregation then screens reduced parts in parameter space, comparing
    /// `reference - reduced` with `reference - ours`, because offsets of
    /// honest peers differ from their mean by a large fraction of their own
    /// size while the parameters they imply do not.
    pub fn start_round_around(
        &mut self,
        now: Duration,
        round: u64,
        values: Vec<f32>,
        reference: Option<Vec<f32>>,
    ) -> Result<(), AveragingError> {
        self.observe(now);
        if let Some(r) = &reference {
            if r.len() != values.len() {
                return Err(AveragingError::ReferenceLength {
                    want: values.len(),
                    got: r.len(),
                });
            }
        }
        if let Some(current) = self.in_flight() {
            return Err(AveragingError::InFlight { round: current });
        }
        if let Some(last) = self.last_finished {
            if round <= last {
                return Err(AveragingError::Stale { round, last });
            }
        }
        if values.len() as u64 > MAX_VECTOR_LEN {
            return Err(AveragingError::TooLong {
                len: values.len(),
                max: MAX_VECTOR_LEN,
            });
        }
        if let Some(index) = crate::tensor::first_non_finite(&values) {
            return Err(AveragingError::NonFinite { index });
        }
        self.reference = reference;
        let proof = self.attestor.attest(self.me, round, values.len() as u64);
        let mut mm = Matchmaking::new(round, values, proof, now, self.waits(), &self.config);
        for (from, joined) in self.joins.take(round) {
            if self.sit_outs.sits_out(from, round) {
                continue;
            }
            // Checked on receipt, but maybe for another scope: a pipeline
            // node may have moved to another stage since.
            if !self.attestor.verify(from, round, joined.len, &joined.proof) {
                continue;
            }
            if let Err(reason) = mm.add_joiner(now, self.me, from, joined) {
                self.out.reject(from, reason);
            }
        }
        // Peers that already joined a later round are past this one: not
        // waited for (too many to set aside: the join window bounds the wait).
        for peer in self.joins.ahead_of(round) {
            if mm.set_aside(&[peer]).is_err() {
                break;
            }
        }
        self.out.send(
            Destination::Broadcast,
            AvgMessage::Join {
                round,
                len: mm.len,
                proof: mm.proof.clone(),
            },
        );
        self.state = State::Matchmaking(Box::new(mm));
        self.try_close(now);
        Ok(())
    }

    /// Feeds a message received from `from`.
    pub fn handle_message(&mut self, now: Duration, from: NodeId, msg: AvgMessage) {
        self.observe(now);
        if from == self.me {
            return;
        }
        if let Err(e) = msg.validate_structure() {
            self.out.reject(
                from,
                format!("invalid {} for round {}: {e}", msg.kind(), msg.round()),
            );
            return;
        }
        match msg {
            AvgMessage::Join { round, len, proof } => {
                self.on_join(now, from, round, Joined { len, proof })
            }
            group @ AvgMessage::Group { .. } => self.on_group(now, from, group),
            AvgMessage::Part {
                round,
                part,
                payload,
            } => self.on_part(from, round, part, &payload),
            AvgMessage::Reduced {
                round,
                part,
                contributors,
                payload,
            } => self.on_reduced(from, round, part, contributors, &payload),
        }
        self.finish_if_complete(now);
    }

    /// Drops `member` from the all-reduce in flight, if it is in its group: the transport saw
    /// it send something invalid (a NaN payload, a bad digest), which no honest member does,
    /// so its contribution and its reduced part are not waited for, and nothing it sends later
    /// in the round counts. A no-op between rounds.
    pub fn exclude_member(&mut self, now: Duration, member: NodeId) {
        self.observe(now);
        if let State::Reducing(ar) = &mut self.state {
            ar.distrust(member, &mut self.out);
        }
        self.finish_if_complete(now);
    }

    /// Runs the timers that are due at `now`: `Join` and `Part` re-sends, closing the group,
    /// the reducer deadline, giving up, the reduce deadline.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.observe(now);
        self.recheck = false;
        self.try_close(now);
        let give_up = match &mut self.state {
            State::Matchmaking(mm) if now >= mm.give_up_at() => true,
            State::Matchmaking(mm) => {
                if mm.rebroadcast_due(now, &self.config) {
                    let join = AvgMessage::Join {
                        round: mm.round,
                        len: mm.len,
                        proof: mm.proof.clone(),
                    };
                    self.out.send(Destination::Broadcast, join);
                }
                false
            }
            State::Reducing(ar) => {
                ar.on_timeout(now, &self.config, &mut self.out);
                false
            }
            State::Idle => false,
        };
        if give_up {
            self.give_up_waiting();
        }
        self.finish_if_complete(now);
    }

    /// The next message to send, oldest first.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        loop {
            match self.out.transmits.pop_front()? {
                Pending::Ready(t) => return Some(t),
                Pending::Part { to, round, part } => {
                    // A part of a round that ended, or acknowledged meanwhile, is not sent.
                    if let State::Reducing(ar) = &mut self.state {
                        if ar.round() == round {
                            if let Some(msg) = ar.part_message(part) {
                                return Some(Transmit {
                                    to: Destination::Peer(to),
                                    msg,
                                });
                            }
                        }
                    }
                }
            }
        }
    }

    /// The earliest `now` at which [`Averager::handle_timeout`] must be called, if any.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.state {
            State::Idle => None,
            State::Matchmaking(_) | State::Reducing(_) if self.recheck => Some(self.last_now),
            State::Matchmaking(mm) => Some(mm.next_timeout(self.me)),
            State::Reducing(ar) => Some(ar.next_timeout()),
        }
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<AvgEvent> {
        self.out.events.pop_front()
    }

    fn observe(&mut self, now: Duration) {
        self.last_now = self.last_now.max(now);
    }

    /// Our round in flight, else the last finished one: the reference for "old" and "ahead".
    fn base_round(&self) -> Option<u64> {
        self.in_flight().or(self.last_finished)
    }

    fn on_join(&mut self, now: Duration, from: NodeId, round: u64, joined: Joined) {
        // Cheap checks first: a proof costs a signature check.
        let led_it = self.led.as_ref().is_some_and(|led| led.round == round);
        let in_matchmaking = match &self.state {
            State::Matchmaking(mm) if mm.round == round => {
                if mm.has_joined_with(&from, &joined.proof) {
                    return; // a re-broadcast of a Join already counted
                }
                true
            }
            _ => false,
        };
        if !led_it && matches!(&self.state, State::Reducing(ar) if ar.round() == round) {
            // Its sender is authenticated by the transport: no proof needed.
            self.pass_group_on(now, from);
            return;
        }
        let stale = self.base_round().is_some_and(|base| round <= base);
        if stale && !led_it && !in_matchmaking {
            return; // a round we are past: nothing to do
        }
        let grace = self.moved_on_grace();
        if !self.attestor.verify(from, round, joined.len, &joined.proof) {
            self.out.reject(
                from,
                format!("Join for round {round} without a valid proof of its sender's join"),
            );
            return;
        }
        // At most twice per Join re-broadcast interval per peer: an honest
        // peer that missed the Group asks once per interval (twice, should
        // two of its Joins arrive close together).
        let every = self.config.join_retry() / 2;
        if let Some(led) = self.led.as_mut().filter(|led| led.round == round) {
            if answer_again(&mut led.resent, from, now, every) {
                self.out.send(Destination::Peer(from), led.msg.clone());
            }
        }
        match &mut self.state {
            State::Matchmaking(mm) if mm.round == round => {
                if self.sit_outs.sits_out(from, round) {
                    return; // answered with our closed Group once we have one
                }
                match mm.add_joiner(now, self.me, from, joined) {
                    Ok(()) => self.try_close(now),
                    Err(reason) => self.out.reject(from, reason),
                }
                return;
            }
            // `from` is past our round: it will not average it with us.
            State::Matchmaking(mm) if round > mm.round => {
                let regrouped = mm.set_aside(&[from]).is_ok();
                if regrouped {
                    self.try_close(now);
                }
            }
            State::Reducing(ar) if round > ar.round() => {
                ar.moved_on(from, now, grace, &mut self.out);
            }
            _ => {}
        }
        let base = self.base_round();
        if base.is_none_or(|b| round > b) {
            if let Err(reason) = self.joins.insert(base, round, from, joined) {
                self.out.reject(from, reason);
            }
        }
    }

    /// `from` sent a `Join` for the round we are reducing in a group we
    /// followed. If it is a member we have heard nothing from, its leader's
    /// `Group` never reached it (lost, or withheld by a hostile leader): pass
    /// it on, at most once per `Join` re-broadcast interval per member, as
    /// every member of the group does the same. (Waiting for a second `Join`
    /// first, so that a first one gossip delayed triggers nothing, made
    /// rounds under loss and crashes slower in the simulator.)
    fn pass_group_on(&mut self, now: Duration, from: NodeId) {
        let State::Reducing(ar) = &self.state else {
            return;
        };
        let Some(group) = &self.followed else {
            return;
        };
        let every = self.config.join_retry();
        if !ar.never_heard_from(from) || !answer_again(&mut self.passed_on, from, now, every) {
            return;
        }
        self.out.send(Destination::Peer(from), group.clone());
    }

    /// `from` sent us a `Part` of the round in flight, but our `Group` does
    /// not list it: it follows another `Group`. Once per peer and round we
    /// send it the one we follow, so that, should both come from the same
    /// leader, it sees the leader split the round (see
    /// [`Averager::check_for_a_second_group`]) instead of blaming us.
    fn show_our_group(&mut self, from: NodeId) {
        let Some(group) = &self.followed else {
            return; // we led it: our Group went to everyone
        };
        if self.shown_our_group.len() < MAX_GROUP_MEMBERS && self.shown_our_group.insert(from) {
            self.out.send(Destination::Peer(from), group.clone());
        }
    }

    /// A `Group` for the round we are reducing. An honest leader signs one
    /// `Group` per round; a second, different one signed by the leader we
    /// follow proves it told members different groups, so they wait for
    /// each other in vain. It sits out at once, and nothing it sends this
    /// round counts; nor does what each member that shows us the other
    /// `Group` sends (it follows that one), and no member is blamed for
    /// stalling this round.
    fn check_for_a_second_group(&mut self, from: NodeId, msg: &AvgMessage) {
        let (
            Some(AvgMessage::Group {
                len: ours_len,
                members: ours,
                ..
            }),
            AvgMessage::Group {
                round,
                len,
                members,
                proofs,
                signature,
            },
        ) = (&self.followed, msg)
        else {
            return;
        };
        let (Some(&leader), Some(&our_leader)) = (members.first(), ours.first()) else {
            return;
        };
        let same = leader == our_leader && members == ours && len == ours_len;
        if leader != our_leader || same {
            return; // another leader's group, or a duplicate
        }
        if !self
            .attestor
            .verify_group(leader, *round, *len, members, proofs, signature)
        {
            return; // not the leader's: proves nothing
        }
        if self.equivocated.is_none() {
            let round = *round;
            self.out.reject(
                leader,
                format!("{leader} signed two different Groups for round {round}; it sits out"),
            );
            self.sit_outs.forged_group(leader, round);
            self.equivocated = Some(leader);
        }
        if let State::Reducing(ar) = &mut self.state {
            // Nothing the leader sends this round is waited for or counts;
            // nor does what any member that shows us the other `Group` (not
            // only the first) sends: its parts are cut for that one.
            ar.distrust(leader, &mut self.out);
            if from != leader {
                ar.distrust(from, &mut self.out);
            }
        }
    }

    fn on_group(&mut self, now: Duration, from: NodeId, msg: AvgMessage) {
        let AvgMessage::Group {
            round,
            len,
            members,
            proofs,
            signature,
        } = &msg
        else {
            return;
        };
        let (round, len) = (*round, *len);
        let Some(&leader) = members.first() else {
            return; // refused by validation
        };
        // A member may pass on its leader's signed Group (see `join_proof`).
        let passed_on = leader != from;
        if passed_on && members.binary_search(&from).is_err() {
            self.out.reject(
                from,
                format!(
                    "Group for round {round} sent by a peer that is neither its leader (first \
                     member) nor listed in it"
                ),
            );
            return;
        }
        // Reducing this round: a second Group of our leader (benched at
        // once by the first one seen) still says its sender follows it.
        if matches!(&self.state, State::Reducing(ar) if ar.round() == round) {
            return self.check_for_a_second_group(from, &msg);
        }
        if self.sit_outs.sits_out(leader, round) {
            if let State::Matchmaking(mm) = &mut self.state {
                if mm.round == round {
                    mm.saw_group_of_benched_leader();
                }
            }
            self.out.reject(
                from,
                format!(
                    "Group for round {round} led by {leader}, which sits out the round after \
                     stalling"
                ),
            );
            return;
        }
        let mm = match &self.state {
            State::Matchmaking(mm) => mm,
            // Idle, or a round we are not in: a stale Group.
            State::Reducing(_) | State::Idle => return,
        };
        if mm.round != round {
            return;
        }
        if len != mm.len {
            let reason = format!(
                "Group for round {round} has {len} values, ours has {}",
                mm.len
            );
            self.out.reject(from, reason);
            return;
        }
        // Checked only now: most Groups that reach us are stale or duplicates.
        let signed = self
            .attestor
            .verify_group(leader, round, len, members, proofs, signature);
        if passed_on && !signed {
            // The member that passed it on may have changed it: the leader
            // is not to blame.
            self.out.reject(
                from,
                format!(
                    "Group for round {round} passed on without a valid signature of its leader \
                     {leader}"
                ),
            );
            return;
        }
        let unproven = self.unproven_member(mm, members, proofs);
        if unproven.is_some() || !signed {
            // Its leader made a member up, passed on a proof it never
            // checked (and signed it), or did not sign: regroup without the
            // leader.
            let what = match unproven {
                Some(member) => format!("lists {member} without a valid proof that it joined"),
                None => "carries no valid signature of its leader".to_string(),
            };
            self.out.reject(
                from,
                format!("Group for round {round} {what}; regrouping without its leader"),
            );
            self.sit_outs.forged_group(leader, round);
            let State::Matchmaking(mm) = &mut self.state else {
                return;
            };
            if mm.set_aside(&[leader]).is_err() {
                self.finish_alone();
                return;
            }
            self.try_close(now);
            return;
        }
        let waited = mm.elapsed(now);
        self.matchmaking_deadlines.observe_group(waited);
        if members.binary_search(&self.me).is_ok() {
            let members = members.clone();
            self.followed = Some(msg);
            self.form_group(now, members);
            return;
        }
        // Left out (we joined late, the group was full, or the leader is
        // hostile): regroup with whoever else is left, and finish alone only
        // if nobody is.
        let State::Matchmaking(mm) = &mut self.state else {
            return;
        };
        if mm.set_aside(members).is_err() {
            self.finish_alone();
            return;
        }
        self.try_close(now);
    }

    /// The first member of a `Group` for `mm`'s round whose join we can neither vouch for
    /// (its `Join` reached us) nor verify from the proof the `Group` carries for it.
    fn unproven_member(
        &self,
        mm: &Matchmaking,
        members: &[NodeId],
        proofs: &[Bytes],
    ) -> Option<NodeId> {
        members.iter().zip(proofs).find_map(|(&member, proof)| {
            let vouched = member == self.me || mm.has_joined(&member);
            let valid = vouched || self.attestor.verify(member, mm.round, mm.len, proof);
            (!valid).then_some(member)
        })
    }

    fn on_part(&mut self, from: NodeId, round: u64, part: u32, payload: &Payload) {
        match &mut self.state {
            State::Reducing(ar) if ar.round() == round => {
                let stranger = !ar.has_member(from);
                ar.on_part(from, part, payload, &mut self.out);
                if stranger {
                    self.show_our_group(from);
                }
            }
            // Our group has not formed yet: keep the part (bounded, first
            // copy wins) and feed it in when it does.
            State::Matchmaking(mm) if mm.round == round => {
                self.early_parts.keep(from, part, payload, mm.values.len());
            }
            _ => {
                if let Some(last) = &mut self.last_reduced {
                    last.reack(round, from, part, payload, &mut self.out);
                }
            }
        }
    }

    fn on_reduced(
        &mut self,
        from: NodeId,
        round: u64,
        part: u32,
        contributors: Vec<NodeId>,
        payload: &Payload,
    ) {
        if let State::Reducing(ar) = &mut self.state {
            if ar.round() == round {
                ar.on_reduced(from, part, contributors, payload, &mut self.out);
            }
        }
    }

    /// Closes the group if we lead and it is time.
    fn try_close(&mut self, now: Duration) {
        let State::Matchmaking(mm) = &self.state else {
            return;
        };
        if !mm.should_close(self.me, &self.expected_peers(mm.round), now) {
            return;
        }
        let (members, proofs) = mm.members(self.me, self.config.group_limit());
        let signature = self
            .attestor
            .sign_group(self.me, mm.round, mm.len, &members, &proofs);
        let msg = AvgMessage::Group {
            round: mm.round,
            len: mm.len,
            members: members.clone(),
            proofs,
            signature,
        };
        self.led = Some(LedGroup {
            round: mm.round,
            msg: msg.clone(),
            resent: BTreeMap::new(),
        });
        self.out.send(Destination::Broadcast, msg);
        self.form_group(now, members);
    }

    /// Enters the all-reduce with `members` (ascending, containing us).
    fn form_group(&mut self, now: Duration, members: Vec<NodeId>) {
        let State::Matchmaking(mm) = std::mem::replace(&mut self.state, State::Idle) else {
            return;
        };
        let Ok(me_idx) = members.binary_search(&self.me) else {
            self.state = State::Matchmaking(mm);
            return;
        };
        self.observe_joins(&mm);
        self.out.event(AvgEvent::GroupFormed {
            round: mm.round,
            members: members.clone(),
        });
        if members.len() == 1 {
            self.finish(solo_outcome(self.me, mm.round, mm.values));
            return;
        }
        let cfg = AveragingConfig {
            reduce_timeout: self.reduce_deadline(),
            ..self.config.clone()
        };
        self.reduce_started = now;
        let unreachable: Vec<NodeId> = members
            .iter()
            .filter(|&&m| m != self.me && !self.peers.contains(&m))
            .copied()
            .collect();
        let mut ar = AllReduce::start(
            mm.round,
            members,
            me_idx,
            mm.values,
            now,
            &cfg,
            &mut self.out,
        );
        ar.reference = self.reference.take();
        // A member outside our live view cannot be reached: what we send it
        // goes nowhere, so neither its contributions nor its reduced parts
        // are waited for. (This also makes a member listed with a proof
        // replayed from an earlier run of the swarm cost nothing.)
        for member in unreachable {
            ar.exclude(member, &mut self.out);
        }
        self.state = State::Reducing(Box::new(ar));
        // Each replayed part is handled as if it had just arrived.
        for (from, part, payload) in self.early_parts.take() {
            self.on_part(from, mm.round, part, &payload);
        }
        // Members that joined a later round while we were matchmaking (the
        // `Group` reached us late) may never say so again.
        let grace = self.moved_on_grace();
        if let State::Reducing(ar) = &mut self.state {
            for member in self.joins.ahead_of(mm.round) {
                ar.moved_on(member, now, grace, &mut self.out);
            }
        }
    }

    /// Ends a matchmaking that got no `Group` by its give-up time. If a peer
    /// that joined led it (the smallest id) and had its whole join window,
    /// that leader kept the round from forming: an honest one closes within
    /// its window and answers every re-sent `Join` with its `Group`, so it
    /// earns a strike, and one that never sends a `Group` sits out from its
    /// second round on instead of stalling every round (see `sitout`). Not
    /// where a benched leader's `Group` came: the others follow that one.
    fn give_up_waiting(&mut self) {
        let window = self.join_window();
        if let State::Matchmaking(mm) = &self.state {
            if let Some(leader) = mm.silent_leader(self.me, self.last_now, window) {
                self.sit_outs.silent_leader(leader, mm.round);
            }
        }
        self.finish_alone();
    }

    fn finish_alone(&mut self) {
        if let State::Matchmaking(mm) = std::mem::replace(&mut self.state, State::Idle) {
            self.observe_joins(&mm);
            self.finish(solo_outcome(self.me, mm.round, mm.values));
        }
    }

    /// Times the join spread of a matchmaking that ends, if the whole live
    /// view joined (a round that closed on its window measures nothing).
    fn observe_joins(&mut self, mm: &Matchmaking) {
        let expected = self.expected_peers(mm.round);
        if expected.is_empty() {
            return;
        }
        if let Some(took) = mm.all_joined_after(&expected) {
            self.matchmaking_deadlines.observe_joins(took);
        }
    }

    fn finish_if_complete(&mut self, now: Duration) {
        let complete = matches!(&self.state, State::Reducing(ar) if ar.is_complete(now));
        if !complete {
            return;
        }
        if let State::Reducing(ar) = std::mem::replace(&mut self.state, State::Idle) {
            let distrusted = ar.distrusted_members();
            let (outcome, last, stalled) = ar.finish();
            if last.is_some() {
                self.last_reduced = last;
            }
            // Only a round every member finished measures the all-reduce;
            // one that dropped someone ran into the deadline.
            if outcome.dropped.is_empty() {
                self.deadline
                    .observe_complete(now.saturating_sub(self.reduce_started));
            }
            // A leader that signed two Groups split the round: only it is to
            // blame, and its strikes for that (given when it was found out)
            // are not worked off by the round it split, nor are those of
            // the members that followed its other Group (they took no part).
            match self.equivocated {
                Some(leader) => {
                    let rest: Vec<NodeId> = outcome
                        .group
                        .iter()
                        .copied()
                        .filter(|m| *m != leader && !distrusted.contains(m))
                        .collect();
                    self.sit_outs.record(outcome.round, &rest, &[]);
                }
                None => self
                    .sit_outs
                    .record(outcome.round, &outcome.group, &stalled),
            }
            self.finish(outcome);
        }
    }

    fn finish(&mut self, outcome: RoundOutcome) {
        self.state = State::Idle;
        self.followed = None;
        self.passed_on.clear();
        self.shown_our_group.clear();
        self.equivocated = None;
        self.early_parts.clear();
        self.recheck = false;
        self.last_finished = Some(outcome.round);
        self.joins.forget_through(outcome.round);
        self.out.event(AvgEvent::Finished(outcome));
    }
}
