//! The butterfly all-reduce inside a formed group: the vector is cut into parts, and member
//! `k mod n` of the `n` members reduces part k. Short vectors have one part per member; long
//! ones several per member ([`AveragingConfig::part_count`]), so a reducer averages and
//! returns its first parts while later ones are still arriving, and encryption, decoding
//! and reduction overlap instead of running one after the other.

use super::config::{part_encoding, AveragingConfig};
use super::outcome::{Destination, Outbox, PartOutcome, RoundOutcome};
use super::robust::Row;
use super::AvgMessage;
use crate::tensor::{split_ranges, Encoding, Payload};
use crate::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::Duration;

/// A finished part: whose values went into its mean. The mean itself is written over our
/// values of the part as it comes in (nothing reads them after that).
#[derive(Debug)]
struct PartResult {
    contributors: Vec<NodeId>,
}

/// Another member's contribution to a part we reduce, as received.
#[derive(Debug, Clone)]
enum Contribution {
    /// Decoded values (a part sent in a lossy encoding).
    Values(Vec<f32>),
    /// A checked f32 part, summed from where its bytes lie in the received frame.
    F32(Payload),
}

/// The parts we reduced in the last finished round, kept so a member whose `Reduced` got
/// lost and who keeps re-sending its `Part` still gets an answer.
#[derive(Debug)]
pub(crate) struct LastReduced {
    round: u64,
    group: Vec<NodeId>,
    /// Our `Reduced` messages by part index.
    parts: Vec<(u32, AvgMessage)>,
    /// Answers sent so far.
    reacks: Reacks,
}

/// How often each member was answered with a part's `Reduced` again: a few
/// re-acks cover lost answers to an honest member's re-sent `Part`; beyond
/// them, a member sending tiny `Part`s in a loop would have us upload a whole
/// reduced part for each.
#[derive(Debug, Default)]
struct Reacks(BTreeMap<(NodeId, u32), u8>);

/// Re-acks per member and part in one round.
const MAX_REACKS: u8 = 4;

impl Reacks {
    /// Sends `reduced` (our `Reduced` for `part`) again to `member`, whose
    /// re-sent `Part` carried `sent`: only if that has the part's length,
    /// and a few times per member and part at most.
    fn answer(
        &mut self,
        member: NodeId,
        part: u32,
        sent: &Payload,
        reduced: &AvgMessage,
        out: &mut Outbox,
    ) {
        let fits =
            matches!(reduced, AvgMessage::Reduced { payload, .. } if payload.len == sent.len);
        if !fits {
            return;
        }
        let answered = self.0.entry((member, part)).or_insert(0);
        *answered = answered.saturating_add(1);
        if *answered <= MAX_REACKS {
            out.send(Destination::Peer(member), reduced.clone());
        }
    }
}

impl LastReduced {
    /// Answers a late `Part` of that round from one of its members with the stored result,
    /// if it has that part's length (a few times per member and part at most).
    pub(crate) fn reack(
        &mut self,
        round: u64,
        from: NodeId,
        part: u32,
        payload: &Payload,
        out: &mut Outbox,
    ) {
        if round != self.round || self.group.binary_search(&from).is_err() {
            return;
        }
        if let Some((_, msg)) = self.parts.iter().find(|(p, _)| *p == part) {
            self.reacks.answer(from, part, payload, msg, out);
        }
    }
}

/// Where our `Part` for one part stands.
#[derive(Debug, Clone)]
enum Outgoing {
    /// A part we reduce, or one whose `Reduced` arrived: nothing (more) to send.
    Done,
    /// Queued for the driver, not encoded yet.
    Queued,
    /// Encoded and sent; kept for re-sending until acknowledged.
    Sent(Payload),
}

/// One member's view of a group all-reduce.
#[derive(Debug)]
pub(crate) struct AllReduce {
    round: u64,
    group: Vec<NodeId>,
    me_idx: usize,
    /// The values of each part; part `j` is reduced by member `j % group.len()`.
    ranges: Vec<Range<usize>>,
    local: Vec<f32>,
    /// How our `Part`s and our `Reduced` are encoded.
    encoding: Encoding,
    /// Whether parts may travel (and be accepted) as sparse entries
    /// ([`AveragingConfig::sparse`]).
    sparse: bool,
    /// How our parts are reduced, and whether received parts are screened.
    aggregation: super::Aggregation,
    /// Parts whose reduced values we refused as implausible, or whose reducer we excluded
    /// (they stay local; the round does not wait for them). By part.
    refused: Vec<bool>,
    /// Members whose contributions the round no longer waits for: dropped
    /// for sending invalid data, or moved on to a later round. By member.
    excluded: Vec<bool>,
    /// Members excluded for what they sent (invalid data, or a `Part` cut
    /// for another leader's `Group`): unlike members that were only out of
    /// reach, nothing they send later in the round counts. By member.
    distrusted: Vec<bool>,
    /// Members that left our live view during the round (also `excluded`):
    /// not waited for, but struck if they had kept the round waiting, so a
    /// member cannot stall a round and then leave and come back to dodge it.
    departed: Vec<bool>,
    /// Members that sent us a well-formed `Part` or `Reduced` of this round
    /// (one refused as malformed says nothing of whether they took part; a
    /// `Reduced` refused as implausible still shows they did). By member.
    heard: Vec<bool>,
    /// Answers sent again to members re-sending a `Part` we had reduced.
    reacks: Reacks,
    /// Members that joined a later round without a word to us, and until
    /// when we still take their `Reduced` parts (see [`AllReduce::moved_on`]).
    /// Unlike those excluded for invalid data, they count as having stalled
    /// the round. By member.
    moved_on: Vec<Option<Duration>>,
    /// Our `Part` per part, until that part's `Reduced` arrives (ack).
    outgoing: Vec<Outgoing>,
    /// Contributions of the other members to the parts we reduce: by part, then by member
    /// (our own slot stays empty: our values are taken from `local` when reducing; empty
    /// for the parts others reduce, and once the part is reduced).
    contributions: Vec<Vec<Option<Contribution>>>,
    results: Vec<Option<PartResult>>,
    /// Our `Reduced` message per part we reduce, once that part is done.
    reduced: Vec<Option<AvgMessage>>,
    reducer_deadline: Duration,
    deadline: Duration,
    next_retransmit: Duration,
    /// When our values are offsets from this shared reference, received
    /// reduced parts are screened as `reference - values` (parameter space).
    pub(crate) reference: Option<Vec<f32>>,
}

impl AllReduce {
    /// Enters the all-reduce at `now` as member `me_idx` of `group` (ascending), queueing
    /// our values of every part others reduce for its reducer, in part order (so the first
    /// parts arrive, and come back reduced, first). Each is encoded with the configured
    /// compression when the driver takes it ([`AllReduce::part_message`]). Our own
    /// contribution to the parts we reduce never crosses the wire and is averaged as it
    /// is.
    pub(crate) fn start(
        round: u64,
        group: Vec<NodeId>,
        me_idx: usize,
        local: Vec<f32>,
        now: Duration,
        cfg: &AveragingConfig,
        out: &mut Outbox,
    ) -> Self {
        let n = group.len();
        let encoding = cfg.wire_encoding();
        let sparse = cfg.sparse;
        let ranges = split_ranges(local.len(), cfg.part_count(local.len(), n));
        let parts = ranges.len();
        let mut outgoing = vec![Outgoing::Done; parts];
        let mut contributions = vec![Vec::new(); parts];
        for j in 0..parts {
            let reducer = j % n;
            if reducer == me_idx {
                contributions[j] = vec![None; n];
            } else {
                out.send_part(group[reducer], round, j as u32);
                outgoing[j] = Outgoing::Queued;
            }
        }
        AllReduce {
            round,
            results: (0..parts).map(|_| None).collect(),
            reduced: vec![None; parts],
            group,
            me_idx,
            ranges,
            local,
            encoding,
            sparse,
            aggregation: cfg.aggregation,
            refused: vec![false; parts],
            excluded: vec![false; n],
            distrusted: vec![false; n],
            departed: vec![false; n],
            heard: vec![false; n],
            reacks: Reacks::default(),
            moved_on: vec![None; n],
            outgoing,
            contributions,
            reducer_deadline: now.saturating_add(cfg.reducer_wait()),
            deadline: now.saturating_add(cfg.reduce_timeout),
            next_retransmit: now.saturating_add(cfg.retry()),
            reference: None,
        }
    }

    /// The round being reduced.
    pub(crate) fn round(&self) -> u64 {
        self.round
    }

    /// The round's members, ascending.
    pub(crate) fn group(&self) -> &[NodeId] {
        &self.group
    }

    /// The expected number of values in part `j`.
    fn part_len(&self, j: usize) -> usize {
        self.ranges.get(j).map_or(0, |r| r.len())
    }

    /// The index (in the group) of the member that reduces part `j`.
    fn reducer_of(&self, j: usize) -> usize {
        j % self.group.len()
    }

    /// `part` as an index into this round's parts, or `None` (and a rejection of `from`'s
    /// `what`) if the round has no such part.
    fn part_index(&self, what: &str, from: NodeId, part: u32, out: &mut Outbox) -> Option<usize> {
        let parts = self.ranges.len();
        if (part as usize) < parts {
            return Some(part as usize);
        }
        let round = self.round;
        out.reject(
            from,
            format!("{what} {part} for round {round}, but the round has {parts} parts"),
        );
        None
    }

    /// The parts group member `member` reduces.
    fn parts_of(&self, member: usize) -> impl Iterator<Item = usize> {
        (member..self.ranges.len()).step_by(self.group.len())
    }

    /// The parts we reduce whose result we have not sent yet.
    fn unreduced_own_parts(&self) -> impl Iterator<Item = usize> + '_ {
        self.parts_of(self.me_idx)
            .filter(|&j| self.reduced.get(j).is_some_and(Option::is_none))
    }

    /// Our `Part` message for part `j`, encoded now if it was only queued; `None` if there
    /// is nothing to send for it (a part we reduce, or already acknowledged).
    pub(crate) fn part_message(&mut self, part: u32) -> Option<AvgMessage> {
        let j = part as usize;
        let payload = match self.outgoing.get(j)? {
            Outgoing::Done => return None,
            Outgoing::Sent(payload) => payload.clone(),
            Outgoing::Queued => {
                let values = self.local.get(self.ranges[j].clone()).unwrap_or_default();
                let encoding = part_encoding(values, self.encoding, self.sparse);
                let payload = Payload::encode(values, encoding);
                self.outgoing[j] = Outgoing::Sent(payload.clone());
                payload
            }
        };
        Some(AvgMessage::Part {
            round: self.round,
            part,
            payload,
        })
    }

    pub(crate) fn on_part(&mut self, from: NodeId, part: u32, payload: &Payload, out: &mut Outbox) {
        let round = self.round;
        let Ok(idx) = self.group.binary_search(&from) else {
            out.reject(from, format!("Part for round {round} from a non-member"));
            return;
        };
        if self.distrusted.get(idx).is_some_and(|d| *d) {
            return; // excluded for what it sent: its later parts do not count either
        }
        let Some(j) = self.part_index("Part", from, part, out) else {
            return;
        };
        if self.reducer_of(j) != self.me_idx {
            out.reject(
                from,
                format!(
                    "Part {part} for round {round} sent to us, but member {} of the group \
                     reduces it",
                    self.reducer_of(j)
                ),
            );
            return;
        }
        if let Some(Some(msg)) = self.reduced.get(j) {
            // Its `Reduced` was lost: answer again.
            self.reacks.answer(from, part, payload, msg, out);
            if payload.len as usize == self.part_len(j) {
                self.heard[idx] = true;
            }
            return;
        }
        if self
            .contributions
            .get(j)
            .and_then(|slots| slots.get(idx))
            .is_some_and(Option::is_some)
        {
            return; // duplicate: the first contribution wins
        }
        let contribution = match receive_part(payload, self.part_len(j), self.sparse) {
            Ok(c) => c,
            Err(e) => {
                out.reject(from, format!("Part {part} for round {round} {e}"));
                return;
            }
        };
        self.heard[idx] = true;
        if let Some(slot) = self.contributions.get_mut(j).and_then(|s| s.get_mut(idx)) {
            *slot = Some(contribution);
        }
        self.reduce_if_all_in(j, out);
    }

    /// Reduces our part `j` once every member not excluded has contributed to it.
    fn reduce_if_all_in(&mut self, j: usize, out: &mut Outbox) {
        let Some(slots) = self.contributions.get(j) else {
            return;
        };
        let all_in = slots
            .iter()
            .zip(&self.excluded)
            .enumerate()
            .all(|(k, (c, excluded))| k == self.me_idx || c.is_some() || *excluded);
        if all_in && self.reduced.get(j).is_some_and(Option::is_none) {
            self.reduce_own(j, out);
        }
    }

    /// `member` left our live view: it is excluded (not waited for), and
    /// counted as stalling if it had kept the round waiting (see `finish`).
    pub(crate) fn depart(&mut self, member: NodeId, out: &mut Outbox) {
        if let Ok(idx) = self.group.binary_search(&member) {
            if let Some(flag) = self.departed.get_mut(idx) {
                *flag = true;
            }
        }
        self.exclude(member, out);
    }

    /// `member` sent something no honest member sends in this round: it is
    /// excluded, and what it sends later in the round is ignored.
    pub(crate) fn distrust(&mut self, member: NodeId, out: &mut Outbox) {
        if let Ok(idx) = self.group.binary_search(&member) {
            if idx != self.me_idx {
                self.distrusted[idx] = true;
                // Its answers no longer count, so our parts for it would be
                // sent (and re-sent) for nothing.
                for j in self.parts_of(idx).collect::<Vec<_>>() {
                    self.outgoing[j] = Outgoing::Done;
                }
            }
        }
        self.exclude(member, out);
    }

    /// Stops waiting for `member`'s contributions and for the parts it
    /// reduces (those without a result stay local).
    pub(crate) fn exclude(&mut self, member: NodeId, out: &mut Outbox) {
        let Ok(idx) = self.group.binary_search(&member) else {
            return;
        };
        if idx == self.me_idx {
            return;
        }
        if let Some(flag) = self.excluded.get_mut(idx) {
            *flag = true;
        }
        self.refuse_missing_parts_of(idx);
        for j in self.parts_of(self.me_idx) {
            if let Some(c) = self.contributions.get_mut(j).and_then(|s| s.get_mut(idx)) {
                *c = None;
            }
            self.reduce_if_all_in(j, out);
        }
    }

    /// The members distrusted this round (see [`AllReduce::distrust`]).
    pub(crate) fn distrusted_members(&self) -> Vec<NodeId> {
        self.group
            .iter()
            .zip(&self.distrusted)
            .filter(|(_, d)| **d)
            .map(|(m, _)| *m)
            .collect()
    }

    /// Whether `peer` is in this round's group.
    pub(crate) fn has_member(&self, peer: NodeId) -> bool {
        self.group.binary_search(&peer).is_ok()
    }

    /// Whether `member` is in the group, waited for, and has sent us nothing yet.
    pub(crate) fn never_heard_from(&self, member: NodeId) -> bool {
        self.group.binary_search(&member).is_ok_and(|idx| {
            idx != self.me_idx
                && self.heard.get(idx).is_some_and(|heard| !heard)
                && self.excluded.get(idx).is_some_and(|excluded| !excluded)
        })
    }

    /// `member` joined a later round at `now`. If it never sent us anything
    /// for this one, it most likely finished this round without us (alone,
    /// or in a group that left us out): the round stops waiting for its
    /// contributions at once, and for the parts it reduces after `grace`
    /// (they then stay local). The grace is for the one other case: it did
    /// average with us, our reducer deadline reduced our parts without its
    /// lost `Part`, and its `Reduced` is still on the way, overtaken by its
    /// `Join`. It counts as a member that stalled the round
    /// (a strike), or a peer that joins groups and then sends nothing would
    /// never sit out. Members we heard from, or excluded already, are left
    /// as they are.
    pub(crate) fn moved_on(
        &mut self,
        member: NodeId,
        now: Duration,
        grace: Duration,
        out: &mut Outbox,
    ) {
        let Ok(idx) = self.group.binary_search(&member) else {
            return;
        };
        let silent = self.heard.get(idx).is_some_and(|heard| !heard);
        let waited_for = self.excluded.get(idx).is_some_and(|excluded| !excluded);
        if idx == self.me_idx || !silent || !waited_for {
            return;
        }
        self.excluded[idx] = true;
        self.moved_on[idx] = Some(now.saturating_add(grace).min(self.deadline));
        for j in self.parts_of(self.me_idx) {
            self.reduce_if_all_in(j, out);
        }
    }

    /// Refuses the parts still missing from members that moved on, once
    /// their grace is over.
    fn give_up_on_moved_on(&mut self, now: Duration) {
        for idx in 0..self.group.len() {
            if self.moved_on[idx].is_some_and(|until| now >= until) {
                self.refuse_missing_parts_of(idx);
            }
        }
    }

    /// The parts member `idx` reduces that we still wait for: no result, not refused.
    fn missing_parts_of(&self, idx: usize) -> impl Iterator<Item = usize> + '_ {
        self.parts_of(idx).filter(|&j| {
            self.results.get(j).is_some_and(Option::is_none)
                && self.refused.get(j).is_some_and(|refused| !refused)
        })
    }

    /// Stops waiting for the parts member `idx` reduces: those without a
    /// result stay local.
    fn refuse_missing_parts_of(&mut self, idx: usize) {
        let missing: Vec<usize> = self.missing_parts_of(idx).collect();
        for j in missing {
            self.refused[j] = true;
        }
    }

    pub(crate) fn on_reduced(
        &mut self,
        from: NodeId,
        part: u32,
        contributors: Vec<NodeId>,
        payload: &Payload,
        out: &mut Outbox,
    ) {
        let round = self.round;
        let Some(j) = self.part_index("Reduced part", from, part, out) else {
            return;
        };
        let reducer_idx = self.reducer_of(j);
        let reducer = self.group[reducer_idx];
        if reducer != from {
            out.reject(
                from,
                format!(
                    "Reduced part {part} for round {round}, but that part's reducer is {reducer}"
                ),
            );
            return;
        }
        if reducer_idx == self.me_idx {
            out.reject(
                from,
                format!("Reduced part {part} for round {round}, which we reduce"),
            );
            return;
        }
        if self.distrusted[reducer_idx] {
            return; // excluded for what it sent: its parts stay local
        }
        if self.results.get(j).is_some_and(Option::is_some) {
            return; // duplicate
        }
        if let Some(stranger) = contributors
            .iter()
            .find(|c| self.group.binary_search(c).is_err())
        {
            out.reject(
                from,
                format!("Reduced part {part} for round {round} lists non-member {stranger}"),
            );
            return;
        }
        if contributors.binary_search(&from).is_err() {
            out.reject(
                from,
                format!("Reduced part {part} for round {round} omits its own reducer"),
            );
            return;
        }
        let range = self.ranges[j].clone();
        if self.aggregation.is_robust() {
            let values = match decode_part(payload, self.part_len(j), self.sparse) {
                Ok(v) => v,
                Err(e) => {
                    out.reject(from, format!("Reduced part {part} for round {round} {e}"));
                    return;
                }
            };
            self.acknowledged(j, reducer_idx);
            let own = self.local.get(range.clone()).unwrap_or_default();
            let plausible = match &self.reference {
                Some(r) => {
                    let base = r.get(range.clone()).unwrap_or_default();
                    self.aggregation.plausible_around(base, own, &values)
                }
                None => self.aggregation.plausible(own, &values),
            };
            if !plausible {
                if let Some(flag) = self.refused.get_mut(j) {
                    *flag = true;
                }
                out.reject(
                    from,
                    format!("Reduced part {part} for round {round} is implausibly far from our values; keeping ours"),
                );
                return;
            }
            if let Some(dst) = self.local.get_mut(range) {
                if dst.len() == values.len() {
                    dst.copy_from_slice(&values);
                }
            }
        } else {
            // Nothing screens a plain mean: it is decoded straight over our values of the
            // part, once every check has passed.
            let placed = check_part(payload, self.part_len(j), self.sparse).and_then(|()| {
                let dst = self
                    .local
                    .get_mut(range)
                    .ok_or_else(|| "lies outside the vector".to_string())?;
                payload
                    .decode_into(dst)
                    .map_err(|e| format!("is invalid: {e}"))
            });
            if let Err(e) = placed {
                out.reject(from, format!("Reduced part {part} for round {round} {e}"));
                return;
            }
            self.acknowledged(j, reducer_idx);
        }
        if let Some(slot) = self.results.get_mut(j) {
            *slot = Some(PartResult { contributors });
        }
    }

    /// Part `j`'s result came from its reducer (member `reducer_idx`): our `Part` for it
    /// needs no more re-sending.
    fn acknowledged(&mut self, j: usize, reducer_idx: usize) {
        self.heard[reducer_idx] = true;
        if let Some(slot) = self.outgoing.get_mut(j) {
            *slot = Outgoing::Done;
        }
    }

    /// Reduces our part `j` from the contributions in, and sends the result to every other
    /// member.
    fn reduce_own(&mut self, j: usize, out: &mut Outbox) {
        let slots = self.contributions.get_mut(j).map(std::mem::take);
        let slots = slots.unwrap_or_default();
        let mut contributors = Vec::new();
        let mut rows: Vec<Row> = Vec::new();
        for (k, (member, contribution)) in self.group.iter().zip(&slots).enumerate() {
            let row = if k == self.me_idx {
                // Our contribution as it is: it never crosses the wire, so it loses
                // nothing to the codec, and quantising it would only add error and a pass.
                Row::Own
            } else {
                match contribution {
                    Some(Contribution::Values(values)) => Row::Values(values),
                    // Checked on receipt: `f32_le` only borrows its bytes.
                    Some(Contribution::F32(payload)) => match payload.f32_le() {
                        Ok(Some(le)) => Row::F32Le(le),
                        _ => continue,
                    },
                    None => continue,
                }
            };
            contributors.push(*member);
            rows.push(row);
        }
        // The result takes the place of our values of the part (ranges cover the vector).
        let Some(own) = self.local.get_mut(self.ranges[j].clone()) else {
            return;
        };
        self.aggregation.reduce_into_own(&rows, own);
        let encoding = part_encoding(own, self.encoding, self.sparse);
        // We keep what the members decode.
        let payload = Payload::encode_keeping_decoded(own, encoding);
        let msg = AvgMessage::Reduced {
            round: self.round,
            part: j as u32,
            contributors: contributors.clone(),
            payload,
        };
        for (k, member) in self.group.iter().enumerate() {
            if k != self.me_idx {
                out.send(Destination::Peer(*member), msg.clone());
            }
        }
        if let Some(slot) = self.results.get_mut(j) {
            *slot = Some(PartResult { contributors });
        }
        if let Some(slot) = self.reduced.get_mut(j) {
            *slot = Some(msg);
        }
    }

    pub(crate) fn on_timeout(&mut self, now: Duration, cfg: &AveragingConfig, out: &mut Outbox) {
        self.give_up_on_moved_on(now);
        if now >= self.reducer_deadline {
            let pending: Vec<usize> = self.unreduced_own_parts().collect();
            for j in pending {
                self.reduce_own(j, out);
            }
        }
        if now >= self.next_retransmit {
            self.next_retransmit = now.saturating_add(cfg.retry());
            if now < self.deadline {
                for (j, state) in self.outgoing.iter().enumerate() {
                    // Queued parts have not gone out once yet; they are still in the outbox.
                    if let Outgoing::Sent(payload) = state {
                        out.send(
                            Destination::Peer(self.group[self.reducer_of(j)]),
                            AvgMessage::Part {
                                round: self.round,
                                part: j as u32,
                                payload: payload.clone(),
                            },
                        );
                    }
                }
            }
        }
    }

    pub(crate) fn is_complete(&self, now: Duration) -> bool {
        now >= self.deadline
            || self
                .results
                .iter()
                .zip(&self.refused)
                .all(|(r, refused)| r.is_some() || *refused)
    }

    pub(crate) fn next_timeout(&self) -> Duration {
        let mut t = self.deadline;
        for (idx, until) in self.moved_on.iter().enumerate() {
            if let Some(until) = until.filter(|_| self.missing_parts_of(idx).next().is_some()) {
                t = t.min(until);
            }
        }
        if self.unreduced_own_parts().next().is_some() {
            t = t.min(self.reducer_deadline);
        }
        if self.outgoing.iter().any(|o| !matches!(o, Outgoing::Done)) {
            t = t.min(self.next_retransmit);
        }
        t
    }

    /// Assembles the round's outcome (our vector, its averaged parts replaced as their
    /// means came in), what to keep for late re-acks, and the dropped members that made
    /// the round wait (not those excluded for invalid data or one of whose reduced parts
    /// we refused: that costs no time; those that moved on without a word do count).
    ///
    /// Only what this node saw itself makes a member one that made the round wait: a
    /// contribution missing from a part it reduced, or a reducer whose part never came.
    /// Another reducer's list of contributors says who is in its mean, not who stalled:
    /// a hostile reducer listing only itself would otherwise have every honest member
    /// strike every other (see `sitout`).
    pub(crate) fn finish(self) -> (RoundOutcome, Option<LastReduced>, Vec<NodeId>) {
        let n = self.group.len();
        let me = self.group[self.me_idx];
        let values = self.local;
        let mut parts = Vec::with_capacity(self.ranges.len());
        let mut dropped = BTreeSet::new();
        let mut seen_stalling = BTreeSet::new();
        let mut refused_any = vec![false; n];
        for (j, refused) in self.refused.iter().enumerate() {
            if *refused {
                refused_any[j % n] = true;
            }
        }
        for (j, (range, result)) in self.ranges.iter().zip(self.results).enumerate() {
            match result {
                Some(result) => {
                    let missing = self
                        .group
                        .iter()
                        .filter(|m| result.contributors.binary_search(m).is_err());
                    if j % n == self.me_idx {
                        seen_stalling.extend(missing.clone());
                    }
                    dropped.extend(missing);
                    parts.push(PartOutcome {
                        range: range.clone(),
                        contributors: result.contributors,
                        averaged: true,
                    });
                }
                None => {
                    dropped.insert(self.group[j % n]);
                    seen_stalling.insert(self.group[j % n]);
                    parts.push(PartOutcome {
                        range: range.clone(),
                        contributors: vec![me],
                        averaged: false,
                    });
                }
            }
        }
        dropped.remove(&me);
        let stalled = self
            .group
            .iter()
            .enumerate()
            .filter(|(k, m)| {
                let left = self.moved_on[*k].is_some() || self.departed[*k];
                *m != &me
                    && seen_stalling.contains(*m)
                    && (left || (!self.excluded[*k] && !refused_any[*k]))
            })
            .map(|(_, m)| *m)
            .collect();
        let reduced: Vec<(u32, AvgMessage)> = self
            .reduced
            .into_iter()
            .enumerate()
            .filter_map(|(j, msg)| msg.map(|m| (j as u32, m)))
            .collect();
        let last = (!reduced.is_empty()).then(|| LastReduced {
            round: self.round,
            group: self.group.clone(),
            parts: reduced,
            reacks: self.reacks,
        });
        let outcome = RoundOutcome {
            round: self.round,
            group: self.group,
            values,
            parts,
            dropped: dropped.into_iter().collect(),
        };
        (outcome, last, stalled)
    }
}

/// Decodes a received `Part` or `Reduced` payload that must carry `want` values, checking
/// the cheap things first: a dense encoding unless the swarm's values are `sparse` (top-k
/// would average dropped parameters as zeros) and the declared length (before decoding
/// allocates it). The error reads after "Part k for round r".
fn decode_part(payload: &Payload, want: usize, sparse: bool) -> Result<Vec<f32>, String> {
    check_part(payload, want, sparse)?;
    payload.decode().map_err(|e| format!("is invalid: {e}"))
}

/// The cheap checks of [`decode_part`]: the encoding and the declared length.
fn check_part(payload: &Payload, want: usize, sparse: bool) -> Result<(), String> {
    if !payload.encoding.is_dense() && !sparse {
        return Err(format!(
            "is {}-encoded; averaging needs dense values (f32, f16, bf16 or int8)",
            payload.encoding
        ));
    }
    if payload.len as usize != want {
        return Err(format!("has {} values, the part has {want}", payload.len));
    }
    Ok(())
}

/// [`decode_part`] for a contribution we reduce: an f32 part is checked and kept as it
/// lies in its frame (the reduction reads it there), other encodings are decoded.
fn receive_part(payload: &Payload, want: usize, sparse: bool) -> Result<Contribution, String> {
    check_part(payload, want, sparse)?;
    let invalid = |e| format!("is invalid: {e}");
    match payload.f32_le().map_err(invalid)? {
        Some(_) => Ok(Contribution::F32(payload.clone())),
        None => payload.decode().map(Contribution::Values).map_err(invalid),
    }
}
