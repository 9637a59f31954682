//! The butterfly all-reduce inside a formed group: member k reduces part k.

use super::config::{part_encoding, AveragingConfig};
use super::outcome::{Destination, Outbox, PartOutcome, RoundOutcome};
use super::AvgMessage;
use crate::tensor::{quantize, split_ranges, Encoding, Payload};
use crate::NodeId;
use std::collections::BTreeSet;
use std::ops::Range;
use std::time::Duration;

/// A finished part: its mean and whose values went into it.
#[derive(Debug)]
struct PartResult {
    contributors: Vec<NodeId>,
    values: Vec<f32>,
}

/// The part we reduced in the last finished round, kept so a member whose `Reduced` got lost
/// and who keeps re-sending its `Part` still gets an answer.
#[derive(Debug)]
pub(crate) struct LastReduced {
    round: u64,
    group: Vec<NodeId>,
    part: u32,
    msg: AvgMessage,
}

impl LastReduced {
    /// Answers a late `Part` of that round from one of its members with the stored result.
    pub(crate) fn reack(&self, round: u64, from: NodeId, part: u32, out: &mut Outbox) {
        if round == self.round && part == self.part && self.group.binary_search(&from).is_ok() {
            out.send(Destination::Peer(from), self.msg.clone());
        }
    }
}

/// One member's view of a group all-reduce.
#[derive(Debug)]
pub(crate) struct AllReduce {
    round: u64,
    group: Vec<NodeId>,
    me_idx: usize,
    ranges: Vec<Range<usize>>,
    local: Vec<f32>,
    /// How our `Part`s and our `Reduced` are encoded.
    encoding: Encoding,
    /// Whether parts may travel (and be accepted) as sparse entries
    /// ([`AveragingConfig::sparse`]).
    sparse: bool,
    /// How our part is reduced, and whether received parts are screened.
    aggregation: super::Aggregation,
    /// Parts whose reduced values we refused as implausible (they stay local; the round
    /// does not wait for them).
    refused: Vec<bool>,
    /// Members dropped from this round for sending invalid data.
    excluded: Vec<bool>,
    /// Our `Part` payload per part, until that part's `Reduced` arrives (ack).
    outgoing: Vec<Option<Payload>>,
    /// Contributions to our part, by member index.
    contributions: Vec<Option<Vec<f32>>>,
    results: Vec<Option<PartResult>>,
    /// Our `Reduced` message once our part is done.
    reduced: Option<AvgMessage>,
    reducer_deadline: Duration,
    deadline: Duration,
    next_retransmit: Duration,
    /// When our values are offsets from this shared reference, received
    /// reduced parts are screened as `reference - values` (parameter space).
    pub(crate) reference: Option<Vec<f32>>,
}

impl AllReduce {
    /// Enters the all-reduce at `now` as member `me_idx` of `group` (ascending), sending our
    /// values of every other part to its reducer, encoded with the configured compression.
    /// Our own contribution to our part goes through the same quantisation, so every
    /// contribution is averaged as its reducer sees it.
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
        let ranges = split_ranges(local.len(), n);
        let mut outgoing = vec![None; n];
        let mut contributions = vec![None; n];
        for (j, range) in ranges.iter().enumerate() {
            let values = local.get(range.clone()).unwrap_or_default();
            let part_encoding = part_encoding(values, encoding, sparse);
            if j == me_idx {
                contributions[j] = Some(quantize(values, part_encoding));
                continue;
            }
            let payload = Payload::encode(values, part_encoding);
            out.send(
                Destination::Peer(group[j]),
                AvgMessage::Part {
                    round,
                    part: j as u32,
                    payload: payload.clone(),
                },
            );
            outgoing[j] = Some(payload);
        }
        AllReduce {
            round,
            results: (0..n).map(|_| None).collect(),
            group,
            me_idx,
            ranges,
            local,
            encoding,
            sparse,
            aggregation: cfg.aggregation,
            refused: vec![false; n],
            excluded: vec![false; n],
            outgoing,
            contributions,
            reduced: None,
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

    /// The expected number of values in part `j`.
    fn part_len(&self, j: usize) -> usize {
        self.ranges.get(j).map_or(0, |r| r.len())
    }

    /// A member's values for our part.
    pub(crate) fn on_part(&mut self, from: NodeId, part: u32, payload: &Payload, out: &mut Outbox) {
        let round = self.round;
        let Ok(idx) = self.group.binary_search(&from) else {
            out.reject(from, format!("Part for round {round} from a non-member"));
            return;
        };
        if part as usize != self.me_idx {
            out.reject(
                from,
                format!(
                    "Part {part} for round {round} sent to us, but we reduce part {}",
                    self.me_idx
                ),
            );
            return;
        }
        if let Some(msg) = &self.reduced {
            // Already reduced: a repeat means our Reduced was lost; answer it again.
            out.send(Destination::Peer(from), msg.clone());
            return;
        }
        if self.contributions.get(idx).is_some_and(Option::is_some) {
            return; // duplicate: the first contribution wins
        }
        let want = self.part_len(self.me_idx);
        let values = match decode_part(payload, want, self.sparse) {
            Ok(v) => v,
            Err(e) => {
                out.reject(from, format!("Part {part} for round {round} {e}"));
                return;
            }
        };
        if let Some(slot) = self.contributions.get_mut(idx) {
            *slot = Some(values);
        }
        self.reduce_if_all_in(out);
    }

    /// Reduces our part once every member not excluded has contributed.
    fn reduce_if_all_in(&mut self, out: &mut Outbox) {
        let all_in = self
            .contributions
            .iter()
            .zip(&self.excluded)
            .all(|(c, excluded)| c.is_some() || *excluded);
        if all_in && self.reduced.is_none() {
            self.reduce_own(out);
        }
    }

    /// Stops waiting for `member` in this round: neither its contribution to our part nor
    /// its reduced part (which stays local) is waited for. Ourselves and strangers are ignored.
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
        if self.results.get(idx).is_some_and(Option::is_none) {
            if let Some(flag) = self.refused.get_mut(idx) {
                *flag = true;
            }
        }
        if let Some(c) = self.contributions.get_mut(idx) {
            *c = None;
        }
        self.reduce_if_all_in(out);
    }

    /// A reducer's result for its part.
    pub(crate) fn on_reduced(
        &mut self,
        from: NodeId,
        part: u32,
        contributors: Vec<NodeId>,
        payload: &Payload,
        out: &mut Outbox,
    ) {
        let round = self.round;
        let j = part as usize;
        let Some(&reducer) = self.group.get(j) else {
            out.reject(
                from,
                format!(
                    "Reduced part {part} for round {round}, but the group has {} parts",
                    self.group.len()
                ),
            );
            return;
        };
        if reducer != from {
            out.reject(
                from,
                format!(
                    "Reduced part {part} for round {round}, but that part's reducer is {reducer}"
                ),
            );
            return;
        }
        if j == self.me_idx {
            out.reject(
                from,
                format!("Reduced part {part} for round {round}, which we reduce"),
            );
            return;
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
        let values = match decode_part(payload, self.part_len(j), self.sparse) {
            Ok(v) => v,
            Err(e) => {
                out.reject(from, format!("Reduced part {part} for round {round} {e}"));
                return;
            }
        };
        if let Some(slot) = self.outgoing.get_mut(j) {
            *slot = None; // acknowledged
        }
        let own = self.local.get(self.ranges[j].clone()).unwrap_or_default();
        let plausible = match &self.reference {
            Some(r) => {
                let base = r.get(self.ranges[j].clone()).unwrap_or_default();
                self.aggregation.plausible_around(base, own, &values)
            }
            None => self.aggregation.plausible(own, &values),
        };
        if !plausible {
            // A robust swarm keeps its own values for this part rather than a result far
            // from them: a hostile reducer can hold its part back, not steer it.
            if let Some(flag) = self.refused.get_mut(j) {
                *flag = true;
            }
            out.reject(
                from,
                format!("Reduced part {part} for round {round} is implausibly far from our values; keeping ours"),
            );
            return;
        }
        if let Some(slot) = self.results.get_mut(j) {
            *slot = Some(PartResult {
                contributors,
                values,
            });
        }
    }

    /// Averages the contributions we have into our part and sends the result to every other
    /// member. The contributions are the decoded (quantised) values; the sum runs in f64 in
    /// member (ascending id) order, then divides and casts to f32, so every peer can recompute
    /// it bit for bit. The result is encoded with our compression, and we keep exactly what
    /// the members decode from it, so the whole group ends with the same values.
    fn reduce_own(&mut self, out: &mut Outbox) {
        let len = self.part_len(self.me_idx);
        let mut contributors = Vec::new();
        let mut rows: Vec<&[f32]> = Vec::new();
        for (member, contribution) in self.group.iter().zip(&self.contributions) {
            if let Some(values) = contribution {
                contributors.push(*member);
                rows.push(values);
            }
        }
        let mean = self.aggregation.reduce(&rows, len);
        let encoding = part_encoding(&mean, self.encoding, self.sparse);
        let msg = AvgMessage::Reduced {
            round: self.round,
            part: self.me_idx as u32,
            contributors: contributors.clone(),
            payload: Payload::encode(&mean, encoding),
        };
        let mean = quantize(&mean, encoding);
        for (j, member) in self.group.iter().enumerate() {
            if j != self.me_idx {
                out.send(Destination::Peer(*member), msg.clone());
            }
        }
        self.contributions = Vec::new();
        if let Some(slot) = self.results.get_mut(self.me_idx) {
            *slot = Some(PartResult {
                contributors,
                values: mean,
            });
        }
        self.reduced = Some(msg);
    }

    /// Re-sends unacknowledged parts and reduces our part at its deadline.
    pub(crate) fn on_timeout(&mut self, now: Duration, cfg: &AveragingConfig, out: &mut Outbox) {
        if self.reduced.is_none() && now >= self.reducer_deadline {
            self.reduce_own(out);
        }
        if now >= self.next_retransmit {
            self.next_retransmit = now.saturating_add(cfg.retry());
            if now < self.deadline {
                for (j, payload) in self.outgoing.iter().enumerate() {
                    if let (Some(payload), Some(member)) = (payload, self.group.get(j)) {
                        out.send(
                            Destination::Peer(*member),
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

    /// Whether the round is over: every part has its result, or the deadline passed.
    pub(crate) fn is_complete(&self, now: Duration) -> bool {
        now >= self.deadline
            || self
                .results
                .iter()
                .zip(&self.refused)
                .all(|(r, refused)| r.is_some() || *refused)
    }

    /// The earliest time something can happen.
    pub(crate) fn next_timeout(&self) -> Duration {
        let mut t = self.deadline;
        if self.reduced.is_none() {
            t = t.min(self.reducer_deadline);
        }
        if self.outgoing.iter().any(Option::is_some) {
            t = t.min(self.next_retransmit);
        }
        t
    }

    /// Assembles the round's outcome (averaged parts replaced, the rest local), what to
    /// keep for late re-acks, and the dropped members that made the round wait (not those
    /// excluded for invalid data or whose reduced part we refused: that costs no time).
    pub(crate) fn finish(self) -> (RoundOutcome, Option<LastReduced>, Vec<NodeId>) {
        let me = self.group[self.me_idx];
        let mut values = self.local;
        let mut parts = Vec::with_capacity(self.ranges.len());
        let mut dropped = BTreeSet::new();
        for ((range, result), reducer) in self.ranges.iter().zip(self.results).zip(&self.group) {
            match result {
                Some(result) => {
                    if let Some(dst) = values.get_mut(range.clone()) {
                        if dst.len() == result.values.len() {
                            dst.copy_from_slice(&result.values);
                        }
                    }
                    dropped.extend(
                        self.group
                            .iter()
                            .filter(|m| result.contributors.binary_search(m).is_err()),
                    );
                    parts.push(PartOutcome {
                        range: range.clone(),
                        contributors: result.contributors,
                        averaged: true,
                    });
                }
                None => {
                    dropped.insert(*reducer);
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
            .zip(self.excluded.iter().zip(&self.refused))
            .filter(|(m, (excluded, refused))| dropped.contains(*m) && !**excluded && !**refused)
            .map(|(m, _)| *m)
            .collect();
        let last = self.reduced.map(|msg| LastReduced {
            round: self.round,
            group: self.group.clone(),
            part: self.me_idx as u32,
            msg,
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
    if !payload.encoding.is_dense() && !sparse {
        return Err(format!(
            "is {}-encoded; averaging needs dense values (f32, f16, bf16 or int8)",
            payload.encoding
        ));
    }
    if payload.len as usize != want {
        return Err(format!("has {} values, the part has {want}", payload.len));
    }
    payload.decode().map_err(|e| format!("is invalid: {e}"))
}
