//! A hostile peer, for tests and measurements of robust aggregation only:
//! `--misbehave` makes a node corrupt every averaging payload it sends (its
//! contributions and the parts it reduces), as an attacker inside the swarm
//! would. Its own model stays honest, so the damage is only what it sends.

use p2ptrain_protocol::averaging::{AvgMessage, Destination, Transmit};
use p2ptrain_protocol::tensor::Payload;

/// How a hostile node corrupts what it sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Misbehave {
    /// Multiplies every value by this factor.
    Scale(f32),
    /// Flips every value's sign.
    Flip,
    /// Sends NaN (refused by every receiver's validation).
    Nan,
    /// Sends honestly but ignores the reduced parts it receives in this
    /// round, so it ends the round on its own values for them: a node that
    /// saw a round only in part, as a slow or briefly cut-off one does.
    DeafInRound(u64),
    /// From this round on, joins groups but sends no tensor (no part, no
    /// reduced part): a member that stalls mid-round, so the others wait
    /// for the reduce deadline every round.
    MuteFrom(u64),
    /// From this round on, stays connected but takes no part in averaging
    /// (sends and heeds no averaging message, so it finishes each round
    /// alone): a peer stuck outside the protocol, which each round's
    /// leader waits its join window for.
    AbsentFrom(u64),
    /// Before training this round, stalls this many seconds (still connected
    /// and answering peers): a node slowed down, as on a busy machine, that
    /// the swarm may finish the run without.
    LagBefore {
        /// The round it is late for.
        round: u64,
        /// How long it stalls.
        secs: u64,
    },
    /// Trains and averages honestly but tells the swarm, in every Progress
    /// message, that it has reached the last possible round: a peer trying
    /// to end everyone's run, or to make them skip rounds.
    ClaimsAhead,
    /// From this round on, every `Group` it leads also lists a made-up
    /// member (with a forged join proof): a hostile leader trying to make
    /// the others send parts to, and wait for, a peer that does not exist.
    PhantomFrom(u64),
    /// From this round on, every `Group` of more than 2 members it sends
    /// (as leader, or passing one on) goes to its members directly, never to
    /// the one with the largest id, and to no peer outside the group: a
    /// hostile leader trying to shut a peer that joined out of the round
    /// while the others wait for it.
    WithholdFrom(u64),
}

/// Makes a misbehaviour that starts at a round.
type FromRound = fn(u64) -> Misbehave;

impl std::str::FromStr for Misbehave {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(fields) = s.strip_prefix("lag:") {
            return parse_lag(s, fields);
        }
        let from_round: [(&str, FromRound); 5] = [
            ("deaf:", Misbehave::DeafInRound),
            ("mute:", Misbehave::MuteFrom),
            ("absent:", Misbehave::AbsentFrom),
            ("phantom:", Misbehave::PhantomFrom),
            ("withhold:", Misbehave::WithholdFrom),
        ];
        for (prefix, make) in from_round {
            if let Some(round) = s.strip_prefix(prefix) {
                return match round.parse::<u64>() {
                    Ok(round) if round > 0 => Ok(make(round)),
                    _ => Err(not_a_misbehaviour(s)),
                };
            }
        }
        match s {
            "flip" => Ok(Misbehave::Flip),
            "nan" => Ok(Misbehave::Nan),
            "claim-ahead" => Ok(Misbehave::ClaimsAhead),
            _ => match s.strip_prefix("scale:").map(str::parse::<f32>) {
                Some(Ok(k)) if k.is_finite() => Ok(Misbehave::Scale(k)),
                _ => Err(not_a_misbehaviour(s)),
            },
        }
    }
}

fn not_a_misbehaviour(s: &str) -> String {
    format!(
        "`{s}` is not a misbehaviour: use flip, nan, scale:FACTOR, deaf:ROUND, mute:ROUND, \
         absent:ROUND, phantom:ROUND, withhold:ROUND, lag:ROUND:SECS or claim-ahead"
    )
}

/// `lag:ROUND:SECS` (`fields` is what follows `lag:` in `s`), both positive.
fn parse_lag(s: &str, fields: &str) -> Result<Misbehave, String> {
    let mut fields = fields.split(':');
    match (fields.next(), fields.next(), fields.next()) {
        (Some(round), Some(secs), None) => match (round.parse(), secs.parse()) {
            (Ok(round), Ok(secs)) if round > 0 && secs > 0 => {
                Ok(Misbehave::LagBefore { round, secs })
            }
            _ => Err(not_a_misbehaviour(s)),
        },
        _ => Err(not_a_misbehaviour(s)),
    }
}

impl std::fmt::Display for Misbehave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misbehave::Scale(k) => write!(f, "scale:{k}"),
            Misbehave::Flip => f.write_str("flip"),
            Misbehave::Nan => f.write_str("nan"),
            Misbehave::DeafInRound(r) => write!(f, "deaf:{r}"),
            Misbehave::MuteFrom(r) => write!(f, "mute:{r}"),
            Misbehave::AbsentFrom(r) => write!(f, "absent:{r}"),
            Misbehave::LagBefore { round, secs } => write!(f, "lag:{round}:{secs}"),
            Misbehave::ClaimsAhead => f.write_str("claim-ahead"),
            Misbehave::PhantomFrom(r) => write!(f, "phantom:{r}"),
            Misbehave::WithholdFrom(r) => write!(f, "withhold:{r}"),
        }
    }
}

impl Misbehave {
    fn corrupt(self, payload: &Payload) -> Payload {
        let Ok(values) = payload.decode() else {
            return payload.clone();
        };
        let bad: Vec<f32> = values
            .iter()
            .map(|v| match self {
                Misbehave::Scale(k) => v * k,
                Misbehave::Flip => -v,
                Misbehave::Nan => f32::NAN,
                Misbehave::DeafInRound(_)
                | Misbehave::MuteFrom(_)
                | Misbehave::AbsentFrom(_)
                | Misbehave::LagBefore { .. }
                | Misbehave::ClaimsAhead
                | Misbehave::PhantomFrom(_)
                | Misbehave::WithholdFrom(_) => *v,
            })
            .collect();
        Payload::encode(&bad, payload.encoding)
    }

    /// How long this node stalls before training `round`.
    pub fn lag_before(self, round: u64) -> Option<std::time::Duration> {
        match self {
            Misbehave::LagBefore { round: r, secs } if r == round => {
                Some(std::time::Duration::from_secs(secs))
            }
            _ => None,
        }
    }

    /// The round this node tells the swarm it has reached, when it has
    /// reached `round`.
    pub fn claimed_round(self, round: u64) -> u64 {
        match self {
            Misbehave::ClaimsAhead => u64::MAX - 1,
            _ => round,
        }
    }

    /// Whether this node ignores `msg` on receipt.
    pub fn ignores(self, msg: &AvgMessage) -> bool {
        match (self, msg) {
            (Misbehave::DeafInRound(deaf), AvgMessage::Reduced { round, .. }) => deaf == *round,
            (Misbehave::AbsentFrom(from), _) => msg.round() >= from,
            _ => false,
        }
    }

    /// Whether this node withholds the outgoing `msg`.
    pub fn withholds(self, msg: &AvgMessage) -> bool {
        match (self, msg) {
            (
                Misbehave::MuteFrom(from),
                AvgMessage::Part { round, .. } | AvgMessage::Reduced { round, .. },
            ) => *round >= from,
            (Misbehave::AbsentFrom(from), _) => msg.round() >= from,
            _ => false,
        }
    }

    /// Corrupts the tensor payload of an outgoing averaging message, or the
    /// member list of a `Group`.
    pub fn apply(self, msg: AvgMessage) -> AvgMessage {
        if let Misbehave::PhantomFrom(from) = self {
            if msg.round() < from {
                return msg;
            }
            return p2ptrain_protocol::sim::with_phantom_member(msg);
        }
        if let Misbehave::DeafInRound(_)
        | Misbehave::MuteFrom(_)
        | Misbehave::AbsentFrom(_)
        | Misbehave::LagBefore { .. }
        | Misbehave::ClaimsAhead
        | Misbehave::WithholdFrom(_) = self
        {
            return msg;
        }
        match msg {
            AvgMessage::Part {
                round,
                part,
                payload,
            } => AvgMessage::Part {
                round,
                part,
                payload: self.corrupt(&payload),
            },
            AvgMessage::Reduced {
                round,
                part,
                contributors,
                payload,
            } => AvgMessage::Reduced {
                round,
                part,
                contributors,
                payload: self.corrupt(&payload),
            },
            other => other,
        }
    }
}

impl Misbehave {
    /// Where the outgoing `t` goes: as addressed, or for a withholding
    /// leader's `Group`, to every member but the one it shuts out (the
    /// largest id), which also gets no re-sent copy.
    pub fn redirect(self, t: Transmit) -> Vec<Transmit> {
        let Misbehave::WithholdFrom(from) = self else {
            return vec![t];
        };
        let AvgMessage::Group { round, members, .. } = &t.msg else {
            return vec![t];
        };
        let (Some(&shut_out), true) = (members.last(), *round >= from && members.len() > 2) else {
            return vec![t];
        };
        match t.to {
            Destination::Broadcast => members[1..members.len() - 1]
                .iter()
                .map(|&m| Transmit {
                    to: Destination::Peer(m),
                    msg: t.msg.clone(),
                })
                .collect(),
            Destination::Peer(p) if p == shut_out => Vec::new(),
            Destination::Peer(_) => vec![t],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2ptrain_protocol::tensor::Bytes;
    use p2ptrain_protocol::tensor::Encoding;
    use p2ptrain_protocol::NodeId;

    #[test]
    fn parses_and_prints_every_kind() {
        for s in [
            "flip",
            "nan",
            "scale:-10",
            "deaf:3",
            "mute:2",
            "absent:4",
            "lag:5:20",
            "claim-ahead",
            "phantom:3",
            "withhold:2",
        ] {
            let m: Misbehave = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
        }
        for bad in [
            "lag:5",
            "lag:0:20",
            "lag:5:0",
            "lag:5:20:1",
            "lag:x:1",
            "lag:lag:5:20",
        ] {
            let e = bad.parse::<Misbehave>().unwrap_err();
            assert!(e.contains(bad) && e.contains("lag:ROUND:SECS"), "{e}");
        }
        let lag = Misbehave::LagBefore { round: 5, secs: 20 };
        assert_eq!(lag.lag_before(5), Some(std::time::Duration::from_secs(20)));
        assert_eq!(lag.lag_before(4), None);
        assert_eq!(Misbehave::Flip.lag_before(5), None);
        assert!("scale:x".parse::<Misbehave>().is_err());
        assert!("evil".parse::<Misbehave>().is_err());
        assert!("absent:0".parse::<Misbehave>().is_err());
        assert_eq!(Misbehave::ClaimsAhead.claimed_round(3), u64::MAX - 1);
        assert_eq!(Misbehave::Flip.claimed_round(3), 3);
    }

    #[test]
    fn an_absent_node_neither_sends_nor_heeds_averaging_from_its_round_on() {
        let m = Misbehave::AbsentFrom(3);
        let join = |round| AvgMessage::Join {
            round,
            len: 2,
            proof: Bytes::from(vec![1; 96]),
        };
        let group = AvgMessage::Group {
            round: 3,
            len: 2,
            members: vec![],
            proofs: vec![],
            signature: Bytes::from(vec![1; 96]),
        };
        assert!(!m.withholds(&join(2)) && !m.ignores(&join(2)));
        for msg in [join(3), join(7), group] {
            assert!(m.withholds(&msg), "{msg:?}");
            assert!(m.ignores(&msg), "{msg:?}");
        }
        assert_eq!(m.apply(join(1)), join(1));
    }

    #[test]
    fn a_mute_node_withholds_tensors_from_its_round_on() {
        let part = |round| AvgMessage::Part {
            round,
            part: 0,
            payload: Payload::encode(&[1.0], Encoding::F32),
        };
        let m = Misbehave::MuteFrom(3);
        assert!(!m.withholds(&part(2)));
        assert!(m.withholds(&part(3)));
        assert!(m.withholds(&part(9)));
        assert_eq!(m.apply(part(3)), part(3), "what it sends is honest");
        assert!(!Misbehave::Flip.withholds(&part(3)));
    }

    #[test]
    fn corrupts_parts_and_reduced_parts() {
        let part = AvgMessage::Part {
            round: 1,
            part: 0,
            payload: Payload::encode(&[1.0, -2.0], Encoding::F32),
        };
        let AvgMessage::Part { payload, .. } = Misbehave::Flip.apply(part.clone()) else {
            panic!("kind changed");
        };
        assert_eq!(payload.decode().unwrap(), vec![-1.0, 2.0]);
        let AvgMessage::Part { payload, .. } = Misbehave::Scale(3.0).apply(part.clone()) else {
            panic!("kind changed");
        };
        assert_eq!(payload.decode().unwrap(), vec![3.0, -6.0]);
        let AvgMessage::Part { payload, .. } = Misbehave::Nan.apply(part) else {
            panic!("kind changed");
        };
        assert!(payload.validate().is_err(), "NaN must not pass validation");
        let join = AvgMessage::Join {
            round: 1,
            len: 2,
            proof: Bytes::from(vec![1; 96]),
        };
        assert_eq!(Misbehave::Flip.apply(join.clone()), join);
    }

    #[test]
    fn a_withholding_leader_sends_its_group_to_all_members_but_the_last() {
        let ids: Vec<NodeId> = (1..=4).map(|n| NodeId([n; 32])).collect();
        let group = |round| AvgMessage::Group {
            round,
            len: 2,
            members: ids.clone(),
            proofs: vec![Bytes::from(vec![1; 96]); 4],
            signature: Bytes::from(vec![1; 96]),
        };
        let to = |t: &[Transmit]| t.iter().map(|t| t.to.clone()).collect::<Vec<_>>();
        let m = Misbehave::WithholdFrom(3);
        let broadcast = |round| Transmit {
            to: Destination::Broadcast,
            msg: group(round),
        };
        assert_eq!(to(&m.redirect(broadcast(2))), vec![Destination::Broadcast]);
        assert_eq!(
            to(&m.redirect(broadcast(3))),
            vec![Destination::Peer(ids[1]), Destination::Peer(ids[2])]
        );
        let resend = |p: NodeId| Transmit {
            to: Destination::Peer(p),
            msg: group(3),
        };
        assert!(m.redirect(resend(ids[3])).is_empty(), "never answers it");
        assert_eq!(m.redirect(resend(ids[2])).len(), 1);
        assert_eq!(Misbehave::Flip.redirect(broadcast(3)).len(), 1);
    }

    #[test]
    fn a_phantom_leader_lists_a_made_up_member_from_its_round_on() {
        let group = |round| AvgMessage::Group {
            round,
            len: 2,
            members: vec![NodeId([1; 32]), NodeId([2; 32])],
            proofs: vec![Bytes::from(vec![1; 96]); 2],
            signature: Bytes::from(vec![1; 96]),
        };
        let m = Misbehave::PhantomFrom(3);
        assert_eq!(m.apply(group(2)), group(2));
        let phantom = m.apply(group(3));
        let AvgMessage::Group {
            members, proofs, ..
        } = &phantom
        else {
            panic!("kind changed");
        };
        assert_eq!(members.len(), 3);
        assert_eq!(members[2], NodeId([0xff; 32]));
        assert_eq!(proofs.len(), 3);
        assert!(phantom.validate().is_ok());
    }
}
