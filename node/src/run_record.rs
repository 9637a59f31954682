//! Run records: a node's per-round figures as JSON lines in its run directory.
//!
//! `--run-dir DIR` makes a node append one line per averaging round and one
//! per evaluation to `DIR/metrics.jsonl`, flushed as they happen, so a run
//! can be plotted while it goes on and what a killed node did is kept.
//! [`read_run_dir`] reads them back for `p2ptrain plot`, naming the file and
//! line of anything it cannot read.

use crate::driver::{NodeEvent, Reporter};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::warn;

/// The file name of a node's records inside its run directory.
pub const FILE_NAME: &str = "metrics.jsonl";

/// One line of a run record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    /// An averaging round ended.
    Round {
        /// Round number, from 1.
        round: u64,
        /// Local steps taken so far.
        step: u64,
        /// Mean training loss of the round's steps (`null` on a stage without loss).
        loss: Option<f32>,
        /// Samples trained on so far by this node.
        samples: u64,
        /// Seconds the node has run, over all its runs into this record
        /// (a resumed node goes on from its last record's time).
        time_s: f64,
    },
    /// The model was evaluated on held-out data.
    Eval {
        /// Rounds done when evaluated.
        round: u64,
        /// Local steps done when evaluated.
        step: u64,
        /// Held-out loss (`null` when this node did not evaluate).
        loss: Option<f32>,
        /// Held-out accuracy, for classifiers.
        accuracy: Option<f32>,
        /// Seconds the node has run, as for a round.
        time_s: f64,
    },
}

impl Record {
    /// When it was written, in seconds the node had run.
    pub fn time_s(&self) -> f64 {
        match self {
            Record::Round { time_s, .. } | Record::Eval { time_s, .. } => *time_s,
        }
    }
}

/// Why run records could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RunRecordError {
    /// A file or directory could not be created, written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A line is not a record.
    #[error("{}:{line}: not a run record ({reason})", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The directory holds no records at all.
    #[error("no {FILE_NAME} in {} or its subdirectories; run nodes with --run-dir (or testnet --run-dir) first", dir.display())]
    Empty {
        /// The directory searched.
        dir: PathBuf,
    },
}

/// Appends a node's records to `DIR/metrics.jsonl`.
pub struct RunRecorder {
    path: PathBuf,
    file: File,
    start: Instant,
    failed: bool,
    /// A failed write left part of a line that could not be cut off again:
    /// no more lines are written, since the next would be glued onto it.
    stopped: bool,
}

impl RunRecorder {
    /// Creates `dir` if needed and opens its record file for appending (a
    /// resumed node goes on in the same file).
    pub fn create(dir: &Path) -> Result<RunRecorder, RunRecordError> {
        std::fs::create_dir_all(dir).map_err(|source| RunRecordError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let io = |source| RunRecordError::Io {
            path: path.clone(),
            source,
        };
        // A pipe there would block the opening below.
        if path.exists() {
            crate::small_file::check_regular(&path, "a run record").map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        // Every line must read back, or `plot` fails on the file later (a
        // run's record is a line per round, cheap to read at start); then
        // the next record must start a line of its own.
        let (records, end) = scan_records(&path)?;
        end_cleanly(&path, &file, end)?;
        // A resumed node's times go on from its last record's, so they
        // never run backwards through the file (time-to-accuracy reads them).
        let before = records.iter().map(Record::time_s).fold(0.0, f64::max);
        let before = Duration::try_from_secs_f64(before).unwrap_or_default();
        let now = Instant::now();
        Ok(RunRecorder {
            path,
            file,
            start: now.checked_sub(before).unwrap_or(now),
            failed: false,
            stopped: false,
        })
    }

    /// The record an event makes, if any.
    pub fn record_of(event: &NodeEvent, time_s: f64) -> Option<Record> {
        let finite = |x: f32| x.is_finite().then_some(x);
        match event {
            NodeEvent::Round(r) => Some(Record::Round {
                round: r.round,
                step: r.step,
                loss: finite(r.loss),
                samples: r.samples,
                time_s,
            }),
            NodeEvent::Evaluated {
                round,
                step,
                test_accuracy,
                test_loss,
            } => Some(Record::Eval {
                round: *round,
                step: *step,
                loss: finite(*test_loss),
                accuracy: *test_accuracy,
                time_s,
            }),
            NodeEvent::Finished(f) => Some(Record::Eval {
                round: f.rounds,
                step: f.steps,
                loss: finite(f.test_loss),
                accuracy: f.test_accuracy,
                time_s,
            }),
            _ => None,
        }
    }

    /// Writes the record of `event`, if it makes one.
    pub fn record(&mut self, event: &NodeEvent) -> Result<(), RunRecordError> {
        let Some(record) = Self::record_of(event, self.start.elapsed().as_secs_f64()) else {
            return Ok(());
        };
        let mut line = serde_json::to_string(&record).map_err(|e| RunRecordError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push('\n');
        if self.stopped {
            return Err(RunRecordError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("an earlier write failed part way; no more lines"),
            });
        }
        append_whole(&mut self.file, line.as_bytes()).map_err(|(source, cut)| {
            self.stopped = !cut;
            RunRecordError::Io {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Wraps a reporter so every event is also recorded. A write failure
    /// (disk full) is logged once and does not stop training.
    pub fn tap(mut self, mut inner: Reporter) -> Reporter {
        Box::new(move |event: &NodeEvent| {
            if let Err(e) = self.record(event) {
                if !self.failed {
                    warn!(error = %e, "cannot write the run record; training goes on without it");
                    self.failed = true;
                }
            }
            inner(event);
        })
    }
}

/// Where record lines go: a file appended to, which can be cut back.
trait LineSink: Write {
    /// Its length now.
    fn length(&self) -> std::io::Result<u64>;
    /// Cuts it back to `len` bytes.
    fn cut_to(&mut self, len: u64) -> std::io::Result<()>;
}

impl LineSink for File {
    fn length(&self) -> std::io::Result<u64> {
        self.metadata().map(|m| m.len())
    }

    fn cut_to(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }
}

/// Appends `line` whole or not at all: what a failed write (a full disk)
/// left of it is cut off again, or the next line would be glued onto it
/// into one that no reader parses, in the middle of the file. On failure,
/// the error and whether the file was cut back to where it was.
fn append_whole(sink: &mut impl LineSink, line: &[u8]) -> Result<(), (std::io::Error, bool)> {
    let before = sink.length().map_err(|e| (e, false))?;
    match sink.write_all(line).and_then(|()| sink.flush()) {
        Ok(()) => Ok(()),
        Err(e) => {
            let cut = sink.cut_to(before).is_ok();
            Err((e, cut))
        }
    }
}

/// How every record line starts (`kind` is the first field written).
const RECORD_START: &str = "{\"kind\":";

/// How a record file ends, as [`scan_records`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Empty, or its last line ends with a newline.
    Clean,
    /// Its last line is a whole record that lacks only its newline.
    Unended,
    /// Its last line lacks its newline and does not parse: a write cut
    /// short, starting at byte `from`. `lone`: it is the file's only line
    /// and does not start as a record does, so nothing shows the file is a
    /// run record at all.
    Partial { from: u64, lone: bool },
}

/// Ends `file` so the records appended next start on a line of their own:
/// a whole last record gets its newline; a last line cut short (a node
/// killed, or a disk filled, while writing it) is cut off, unless it is a
/// lone line that may not be a record (a `--run-dir` pointing at some other
/// `metrics.jsonl`), which is refused and left as it is.
fn end_cleanly(path: &Path, file: &File, end: End) -> Result<(), RunRecordError> {
    let io = |source| RunRecordError::Io {
        path: path.to_path_buf(),
        source,
    };
    match end {
        End::Clean => Ok(()),
        End::Unended => {
            let mut file = file;
            file.write_all(b"\n").map_err(io)
        }
        End::Partial { lone: true, .. } => Err(RunRecordError::Malformed {
            path: path.to_path_buf(),
            line: 1,
            reason: "its only line has no end, and nothing shows it is a record cut short; \
                     not appending to it or cutting it (move it away)"
                .into(),
        }),
        End::Partial { from, lone: false } => {
            let len = file.metadata().map_err(io)?.len();
            warn!(
                path = %path.display(),
                bytes = len - from,
                "run record ends in a partial line (a write cut short); dropped"
            );
            file.set_len(from).map_err(io)
        }
    }
}

/// Reads one record file; an unreadable line is an error naming file and
/// line, except a last line without its newline that does not parse: that
/// is a write cut short (a node killed mid-line), skipped with a warning.
pub fn read_records(path: &Path) -> Result<Vec<Record>, RunRecordError> {
    let (records, end) = scan_records(path)?;
    if let End::Partial { from, .. } = end {
        warn!(path = %path.display(), from, "partial last line skipped");
    }
    Ok(records)
}

/// [`read_records`], also saying how the file ends.
fn scan_records(path: &Path) -> Result<(Vec<Record>, End), RunRecordError> {
    let io = |source| RunRecordError::Io {
        path: path.to_path_buf(),
        source,
    };
    crate::small_file::check_regular(path, "a run record").map_err(io)?;
    let file = File::open(path).map_err(io)?;
    let mut records = Vec::new();
    let mut reader = BufReader::new(file);
    let mut bytes = Vec::new();
    let mut offset = 0u64;
    let mut end = End::Clean;
    for i in 0.. {
        let malformed = |reason: String| RunRecordError::Malformed {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        bytes.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut bytes)
            .map_err(io)?;
        if read == 0 {
            break;
        }
        if bytes.len() as u64 > MAX_LINE_BYTES {
            return Err(malformed(format!(
                "a line longer than {MAX_LINE_BYTES} bytes; records are short lines"
            )));
        }
        let line =
            std::str::from_utf8(&bytes).map_err(|e| malformed(format!("not UTF-8 text ({e})")))?;
        let complete = line.ends_with('\n');
        let from = offset;
        offset += read as u64;
        end = if complete { End::Clean } else { End::Unended };
        if line.trim().is_empty() {
            if !complete {
                end = End::Partial { from, lone: false };
            }
            continue;
        }
        match serde_json::from_str(line.trim_end()) {
            Ok(record) => records.push(record),
            Err(_) if !complete => {
                let lone = from == 0 && !line.starts_with(RECORD_START);
                end = End::Partial { from, lone };
            }
            Err(e) => return Err(malformed(e.to_string())),
        }
    }
    Ok((records, end))
}

/// Longest record line read: far above any record, so a file that is not
/// one (a log without newlines, a disk image) is refused, not read whole.
const MAX_LINE_BYTES: u64 = 1 << 20;

/// One node's records, named after its directory.
#[derive(Debug, Clone)]
pub struct NodeRun {
    /// The directory's path relative to the run directory (`.` for the run directory itself).
    pub name: String,
    /// Its records, in file order.
    pub records: Vec<Record>,
}

/// Where a run directory's records are: `DIR/metrics.jsonl` (named `.`)
/// and `DIR/*/metrics.jsonl` (a testnet's `node-I` directories, named after
/// them), in no particular order. Present, of whatever kind: reading one
/// that is no file names it.
pub fn record_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    if dir.join(FILE_NAME).exists() {
        files.push((".".to_string(), dir.join(FILE_NAME)));
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file = entry.path().join(FILE_NAME);
        if entry.path().is_dir() && file.exists() {
            files.push((entry.file_name().to_string_lossy().into_owned(), file));
        }
    }
    Ok(files)
}

/// Whether `path` is a run record file (`metrics.jsonl`), which `plot` and
/// `export` must never replace: records are what plots are drawn from.
fn is_run_record(path: &Path) -> bool {
    path.is_file() && path.file_name().is_some_and(|n| n == FILE_NAME)
}

/// Whether `path` holds a run's own data, a checkpoint or a run record,
/// which `export` and `plot` write over under no circumstances.
pub fn is_run_data(path: &Path) -> bool {
    is_run_record(path) || crate::checkpoint::looks_like_checkpoint(path)
}

/// A run record already under `dir` (see [`record_files`]), if any: a new
/// run recording there would append to it, and `plot` would mix the runs.
/// None where `dir` is not there yet.
pub fn earlier_records(dir: &Path) -> Option<PathBuf> {
    record_files(dir)
        .unwrap_or_default()
        .into_iter()
        .next()
        .map(|(_, file)| file)
}

/// Reads [`record_files`], sorted by name.
pub fn read_run_dir(dir: &Path) -> Result<Vec<NodeRun>, RunRecordError> {
    let mut files = record_files(dir).map_err(|source| RunRecordError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if files.is_empty() {
        return Err(RunRecordError::Empty {
            dir: dir.to_path_buf(),
        });
    }
    files.sort_by_key(|(name, _)| natural_key(name));
    files
        .into_iter()
        .map(|(name, path)| {
            Ok(NodeRun {
                name,
                records: read_records(&path)?,
            })
        })
        .collect()
}

/// Sorts `node-10` after `node-9`.
fn natural_key(name: &str) -> (String, u64) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, num) = name.split_at(name.len() - digits);
    (stem.to_string(), num.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::RoundReport;

    /// A disk that fills part way through one write, then has room again.
    struct FillingDisk {
        bytes: Vec<u8>,
        room: Option<usize>,
        cuttable: bool,
    }

    impl Write for FillingDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            match self.room {
                Some(0) => {
                    self.room = None; // space comes back after this error
                    Err(std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        "no space left",
                    ))
                }
                Some(room) => {
                    let n = buf.len().min(room);
                    self.room = Some(room - n);
                    self.bytes.extend_from_slice(&buf[..n]);
                    Ok(n)
                }
                None => {
                    self.bytes.extend_from_slice(buf);
                    Ok(buf.len())
                }
            }
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl LineSink for FillingDisk {
        fn length(&self) -> std::io::Result<u64> {
            Ok(self.bytes.len() as u64)
        }

        fn cut_to(&mut self, len: u64) -> std::io::Result<()> {
            if !self.cuttable {
                return Err(std::io::Error::other("read-only now"));
            }
            self.bytes.truncate(len as usize);
            Ok(())
        }
    }

    #[test]
    fn a_write_cut_short_leaves_no_partial_line_behind() {
        let mut disk = FillingDisk {
            bytes: Vec::new(),
            room: None,
            cuttable: true,
        };
        append_whole(&mut disk, b"{\"kind\":\"round\",\"round\":1}\n").unwrap();
        disk.room = Some(10);
        let (err, cut) =
            append_whole(&mut disk, b"{\"kind\":\"round\",\"round\":2}\n").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
        assert!(cut);
        append_whole(&mut disk, b"{\"kind\":\"round\",\"round\":3}\n").unwrap();
        let text = String::from_utf8(disk.bytes).unwrap();
        assert_eq!(
            text,
            "{\"kind\":\"round\",\"round\":1}\n{\"kind\":\"round\",\"round\":3}\n"
        );
        // A partial line that cannot be cut off is reported as such.
        let mut stuck = FillingDisk {
            bytes: Vec::new(),
            room: Some(4),
            cuttable: false,
        };
        let (_, cut) = append_whole(&mut stuck, b"{\"kind\":1}\n").unwrap_err();
        assert!(!cut);
    }

    #[test]
    fn records_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node-0");
        let mut rec = RunRecorder::create(&node).unwrap();
        rec.record(&round(1, 1.25)).unwrap();
        rec.record(&NodeEvent::Listening {
            peer_id: String::new(),
            addrs: vec![],
        })
        .unwrap();
        let runs = read_run_dir(dir.path()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].name, "node-0");
        match &runs[0].records[..] {
            [Record::Round {
                round: 1,
                step: 10,
                loss: Some(l),
                samples: 640,
                ..
            }] => assert_eq!(*l, 1.25),
            other => panic!("{other:?}"),
        }
    }

    /// The report of round `round` (10 steps and 640 samples a round).
    fn round(round: u64, loss: f32) -> NodeEvent {
        NodeEvent::Round(RoundReport {
            round,
            step: round * 10,
            run_step: round * 10,
            total_steps: 100,
            peers: 2,
            loss,
            samples: round * 640,
            samples_per_s: 1.0,
            bytes_sent: 0,
            dropped: 0,
            averaging_s: 0.0,
            reduce_deadline_s: 5.0,
            join_window_s: 2.0,
            model_digest: String::new(),
        })
    }

    /// The round of each record.
    fn rounds(records: &[Record]) -> Vec<u64> {
        records
            .iter()
            .map(|r| match r {
                Record::Round { round, .. } | Record::Eval { round, .. } => *round,
            })
            .collect()
    }

    /// A directory whose record file holds rounds 1 and 2; its file, and
    /// that file's text.
    fn two_rounds_recorded() -> (tempfile::TempDir, std::path::PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = RunRecorder::create(dir.path()).unwrap();
        rec.record(&round(1, 1.0)).unwrap();
        rec.record(&round(2, 1.0)).unwrap();
        drop(rec);
        let path = dir.path().join(FILE_NAME);
        let text = std::fs::read_to_string(&path).unwrap();
        (dir, path, text)
    }

    #[test]
    fn a_line_cut_short_is_skipped_and_cut_before_appending() {
        let (dir, path, mut text) = two_rounds_recorded();
        // A node killed halfway through its third line.
        text.push_str("{\"kind\":\"round\",\"round\":3,\"st");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(rounds(&read_records(&path).unwrap()), [1, 2]);
        // Resumed into the same directory: the partial line goes, the new
        // record starts a line of its own, and the file reads whole.
        let mut rec = RunRecorder::create(dir.path()).unwrap();
        rec.record(&round(3, 1.0)).unwrap();
        assert_eq!(rounds(&read_records(&path).unwrap()), [1, 2, 3]);
        assert!(!std::fs::read_to_string(&path).unwrap().contains("\"st{"));
    }

    #[test]
    fn a_resumed_nodes_times_go_on_from_its_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        // A node that had run 100 s when it was killed.
        let line = |round: u64, time_s: f64| {
            format!("{{\"kind\":\"round\",\"round\":{round},\"step\":{round},\"loss\":1.0,\"samples\":1,\"time_s\":{time_s}}}\n")
        };
        std::fs::write(&path, line(1, 40.0) + &line(2, 100.0)).unwrap();
        let mut rec = RunRecorder::create(dir.path()).unwrap();
        rec.record(&round(3, 1.0)).unwrap();
        let times: Vec<f64> = read_records(&path)
            .unwrap()
            .iter()
            .map(Record::time_s)
            .collect();
        assert_eq!(times.len(), 3);
        assert!((100.0..110.0).contains(&times[2]), "{times:?}");
    }

    #[test]
    fn a_whole_last_record_without_its_newline_is_kept() {
        let (dir, path, mut text) = two_rounds_recorded();
        text.pop();
        std::fs::write(&path, &text).unwrap();
        let mut rec = RunRecorder::create(dir.path()).unwrap();
        rec.record(&round(3, 1.0)).unwrap();
        assert_eq!(rounds(&read_records(&path).unwrap()), [1, 2, 3]);
    }

    #[test]
    fn a_file_that_is_not_a_run_record_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        // A garbage line between records is named, and nothing appended.
        let record = "{\"kind\":\"round\",\"round\":1,\"step\":1,\"loss\":1.0,\"samples\":1,\"time_s\":0.1}\n";
        let mixed = format!("{record}not a record\n{record}");
        std::fs::write(&path, &mixed).unwrap();
        let err = RunRecorder::create(dir.path()).err().expect("refused");
        assert!(err.to_string().contains(":2:"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), mixed);
        // A record cut short during the node's very first write is dropped,
        // and the node goes on.
        std::fs::write(&path, "{\"kind\":\"round\",\"rou").unwrap();
        let mut rec = RunRecorder::create(dir.path()).unwrap();
        rec.record(&round(1, 1.0)).unwrap();
        assert_eq!(rounds(&read_records(&path).unwrap()), [1]);
        drop(rec);
        // Two lines, and one line with no newline at all (which was cut to
        // nothing as a "partial last line").
        for notes in [
            "my own notes\nline two without newline",
            "single line, no newline",
        ] {
            std::fs::write(&path, notes).unwrap();
            let err = RunRecorder::create(dir.path()).err().expect("refused");
            assert!(err.to_string().contains("not a run record"), "{err}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), notes);
        }
    }

    #[test]
    fn a_bad_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(
            &path,
            "{\"kind\":\"round\",\"round\":1,\"step\":1,\"loss\":1.0,\"samples\":1,\"time_s\":0.1}\n\n{\"kind\":\"round\",\"round\":\n",
        )
        .unwrap();
        let err = read_run_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("{}:3:", path.display())), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = read_run_dir(empty.path()).unwrap_err().to_string();
        assert!(err.contains("no metrics.jsonl"), "{err}");
        // Invalid UTF-8 and overlong lines name their line too.
        let record = "{\"kind\":\"round\",\"round\":1,\"step\":1,\"loss\":1.0,\"samples\":1,\"time_s\":0.1}\n";
        let mut bytes = record.as_bytes().to_vec();
        bytes.extend_from_slice(b"\xff\xfe\n");
        std::fs::write(&path, &bytes).unwrap();
        let err = read_run_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("not UTF-8"), "{err}");
        let mut long = record.as_bytes().to_vec();
        long.resize(long.len() + MAX_LINE_BYTES as usize + 10, b' ');
        std::fs::write(&path, &long).unwrap();
        let err = read_run_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("longer than"), "{err}");
        // A metrics.jsonl that is no file is named as such.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let err = read_run_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a directory, not a run record"), "{err}");
    }

    #[test]
    fn node_directories_sort_naturally() {
        let mut names = vec!["node-10", "node-2", "node-1"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, ["node-1", "node-2", "node-10"]);
    }
}
