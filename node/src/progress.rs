//! What `p2ptrain node` prints for people (without `--events`): on a
//! terminal, one live progress line redrawn in place each round (round,
//! loss, samples/s, peers, bytes/s), so a long run does not scroll pages of
//! rounds; elsewhere (a log file, a pipe) one plain line per round.

use crate::driver::{NodeEvent, RoundReport};
use std::io::Write;
use std::time::Instant;

/// Erases the terminal line and returns to its start.
const REDRAW: &str = "\r\x1b[2K";

/// Human progress output on `W`.
pub struct HumanOutput<W: Write> {
    out: W,
    /// Redraw the round line in place (a terminal).
    live: bool,
    /// A live line is on screen without its newline yet.
    pending: bool,
    /// When the previous round was reported, and the bytes sent by then.
    last: Option<(Instant, u64)>,
}

impl<W: Write> HumanOutput<W> {
    /// Writes to `out`; `live` when `out` is a terminal.
    pub fn new(out: W, live: bool) -> HumanOutput<W> {
        HumanOutput {
            out,
            live,
            pending: false,
            last: None,
        }
    }

    /// Prints `e`. Write errors (a closed pipe) are ignored: progress output
    /// must never stop training.
    pub fn report(&mut self, e: &NodeEvent) {
        self.report_at(e, Instant::now());
    }

    fn report_at(&mut self, e: &NodeEvent, now: Instant) {
        if let NodeEvent::Round(r) = e {
            let rate = self.last.and_then(|(t, sent)| {
                let secs = now.duration_since(t).as_secs_f64();
                (secs > 0.0).then(|| r.bytes_sent.saturating_sub(sent) as f64 / secs)
            });
            self.last = Some((now, r.bytes_sent));
            let line = round_line(r, rate);
            let _ = if self.live {
                self.pending = true;
                write!(self.out, "{REDRAW}{line}")
            } else {
                writeln!(self.out, "{line}")
            };
        } else {
            if std::mem::take(&mut self.pending) {
                let _ = writeln!(self.out);
            }
            for line in event_lines(e) {
                let _ = writeln!(self.out, "{line}");
            }
        }
        let _ = self.out.flush();
    }

    /// The writer, for tests.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A round's progress line; `bytes_per_s` is the send rate since the
/// previous round (unknown for the first).
pub fn round_line(r: &RoundReport, bytes_per_s: Option<f64>) -> String {
    let rate = bytes_per_s.map_or("-".to_string(), human_rate);
    format!(
        "round {:>4}  step {:>6}/{}  peers {:>2}  loss {:.4}  {:>8.0} samples/s  sent {:.1} MB ({rate})",
        r.round,
        r.progress_step(),
        r.total_steps,
        r.peers,
        r.loss,
        r.samples_per_s,
        r.bytes_sent as f64 / 1e6,
    )
}

fn human_rate(bytes_per_s: f64) -> String {
    if bytes_per_s >= 1e6 {
        format!("{:.1} MB/s", bytes_per_s / 1e6)
    } else {
        format!("{:.1} kB/s", bytes_per_s / 1e3)
    }
}

/// The lines describing any event but a round.
pub fn event_lines(e: &NodeEvent) -> Vec<String> {
    match e {
        NodeEvent::Listening { peer_id, addrs } => std::iter::once(format!("peer id: {peer_id}"))
            .chain(addrs.iter().map(|a| format!("listening on {a}")))
            .collect(),
        NodeEvent::Started {
            peers,
            stage: Some(stage),
            ..
        } => vec![format!(
            "training with {peers} peer(s): pipeline stage {stage} (the first stage sets the steps)"
        )],
        NodeEvent::Started {
            peers,
            shard,
            total_steps,
            ..
        } => vec![format!(
            "training with {peers} peer(s): {shard} samples in my shard, {total_steps} steps"
        )],
        NodeEvent::Synced {
            round,
            chunks,
            sources,
            avoided,
            secs,
            ..
        } => vec![format!(
            "downloaded the swarm's model (round {round}): {chunks} chunks from {} peers in {secs:.2} s, {} peers avoided",
            sources.len(),
            avoided.len()
        )],
        NodeEvent::Evaluated {
            round,
            test_accuracy,
            test_loss,
            ..
        } => vec![match test_accuracy {
            Some(a) => format!(
                "evaluated after round {round}: test accuracy {:.2}%  test loss {test_loss:.4}",
                a * 100.0
            ),
            None => format!("evaluated after round {round}: test loss {test_loss:.4}"),
        }],
        NodeEvent::Round(r) => vec![round_line(r, None)],
        NodeEvent::Finished(f) => vec![if let Some(p) = &f.pipeline {
            let val = p.val_bpc.map_or("evaluated by stage 0".to_string(), |b| {
                format!("validation {b:.3} bits/char")
            });
            format!(
                "finished stage {} of {}: {val}  bubble {:.0}%  {:.0} KB of activations per step  \
                 at most {} micro-batches held for backward",
                p.stage,
                p.stages,
                p.bubble * 100.0,
                p.activation_bytes_per_step / 1e3,
                p.peak_held_micro_batches
            )
        } else if let Some(acc) = f.test_accuracy {
            format!(
                "finished: test accuracy {:.2}%  test loss {:.4}",
                acc * 100.0,
                f.test_loss
            )
        } else {
            format!("finished: test loss {:.4}", f.test_loss)
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn round(round: u64, sent: u64) -> NodeEvent {
        NodeEvent::Round(RoundReport {
            round,
            step: round * 10,
            run_step: round * 10,
            total_steps: 100,
            peers: 3,
            loss: 0.5,
            samples: 0,
            samples_per_s: 1000.0,
            bytes_sent: sent,
            dropped: 0,
            averaging_s: 0.1,
            reduce_deadline_s: 5.0,
            join_window_s: 2.0,
            model_digest: String::new(),
        })
    }

    #[test]
    fn the_progress_line_shows_where_the_run_stands_not_the_local_count() {
        // A late joiner that downloaded the model of round 50 and trained
        // one round of 10 steps since.
        let NodeEvent::Round(mut joiner) = round(51, 0) else {
            unreachable!()
        };
        (joiner.step, joiner.run_step, joiner.total_steps) = (10, 510, 1000);
        let line = round_line(&joiner, None);
        assert!(line.contains("step    510/1000"), "{line}");
        // A record written before `run_step` existed shows its local count.
        joiner.run_step = 0;
        let line = round_line(&joiner, None);
        assert!(line.contains("step     10/1000"), "{line}");
    }

    fn evaluated() -> NodeEvent {
        NodeEvent::Evaluated {
            round: 2,
            step: 20,
            test_accuracy: Some(0.9),
            test_loss: 0.3,
        }
    }

    #[test]
    fn a_terminal_gets_one_line_redrawn_in_place() {
        let mut h = HumanOutput::new(Vec::new(), true);
        let t0 = Instant::now();
        h.report_at(&round(1, 1_000_000), t0);
        h.report_at(&round(2, 3_000_000), t0 + Duration::from_secs(1));
        h.report_at(&evaluated(), t0 + Duration::from_secs(2));
        let out = String::from_utf8(h.into_inner()).unwrap();
        assert_eq!(out.matches(REDRAW).count(), 2, "{out:?}");
        assert_eq!(
            out.lines().count(),
            2,
            "one live line, then the event: {out:?}"
        );
        assert!(
            out.contains("peers  3") && out.contains("loss 0.5000"),
            "{out:?}"
        );
        // 2 MB in the second between the rounds.
        assert!(out.contains("(2.0 MB/s)"), "{out:?}");
        assert!(
            out.ends_with("test accuracy 90.00%  test loss 0.3000\n"),
            "{out:?}"
        );
    }

    #[test]
    fn a_log_gets_plain_lines() {
        let mut h = HumanOutput::new(Vec::new(), false);
        let t0 = Instant::now();
        h.report_at(&round(1, 0), t0);
        h.report_at(&round(2, 50_000), t0 + Duration::from_secs(2));
        let out = String::from_utf8(h.into_inner()).unwrap();
        assert!(!out.contains('\r') && !out.contains('\x1b'), "{out:?}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with("(-)"), "{out:?}");
        assert!(lines[1].ends_with("(25.0 kB/s)"), "{out:?}");
    }

    #[test]
    fn a_pipeline_start_names_its_stage_not_an_empty_shard() {
        let started = |stage| NodeEvent::Started {
            peers: 4,
            shard: 0,
            total_steps: 0,
            stage,
        };
        assert_eq!(
            event_lines(&started(Some(1))),
            ["training with 4 peer(s): pipeline stage 1 (the first stage sets the steps)"]
        );
        assert_eq!(
            event_lines(&started(None)),
            ["training with 4 peer(s): 0 samples in my shard, 0 steps"]
        );
    }
}
