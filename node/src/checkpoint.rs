//! Checkpoints: a node's parameters and progress on disk, so it can resume.
//!
//! Each checkpoint is one file named after its round and the blake3 hash of
//! its bytes (`ckpt-r00000042-<hash>.bin`), written to a temporary file,
//! synced and renamed into place: a crash mid-write leaves at worst a stray
//! temporary file, never a checkpoint that loads wrongly. Loading verifies the
//! file hash against the name and the parameter digest inside, and falls back
//! to the newest checkpoint that verifies.
//!
//! Format: `P2PTCKPT`, format version (u32 LE), header length (u32 LE), a JSON
//! header, then the parameters as little-endian f32. Version 2 adds the local
//! optimizer's state when the header has an `optim` entry: Adam's first and
//! then second moments, one f32 per parameter each, after the parameters
//! (with their own digest in the header). Version 3 adds, when the header
//! has an `outer` entry, DiLoCo's outer momentum (one f32 per parameter,
//! with its digest in the header) after everything else. Version 1 and 2
//! files still load, without what they lack; a file of a newer version is
//! refused by name.

use crate::task::OptimState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tracing::warn;

const MAGIC: &[u8; 8] = b"P2PTCKPT";
const FORMAT_VERSION: u32 = 3;
/// The oldest format this build still reads.
const OLDEST_READABLE: u32 = 1;
/// Checkpoints kept per directory; older ones are deleted after a new one lands.
pub const KEEP: usize = 3;
/// Longest JSON header we accept, so a corrupt length cannot make us allocate wildly.
const MAX_HEADER: usize = 64 * 1024;
/// Largest checkpoint file read: 64M parameters with both Adam moments and
/// DiLoCo's momentum, far above the models here. A larger file (or
/// `/dev/zero` named like a checkpoint) is refused by its size.
pub const MAX_CHECKPOINT_BYTES: u64 = 1 << 30;

/// What a checkpoint says about the run, beside the parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Swarm the parameters belong to.
    pub swarm: String,
    /// Model name, e.g. `mlp`.
    pub model: String,
    /// Last averaging round completed.
    pub round: u64,
    /// Local steps taken.
    pub step: u64,
    /// Samples trained on by this node.
    pub samples: u64,
    /// blake3 of the parameters' little-endian bytes, hex.
    pub params_digest: String,
    /// Local steps per averaging round of the run that wrote it (absent in
    /// files of older versions): rounds count in these periods, so a resume
    /// with another period would end at another step than planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average_every: Option<u64>,
}

/// The optimizer section's description in the header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OptimMeta {
    /// Steps Adam's moments have seen.
    time: u64,
    /// blake3 of both moment vectors' little-endian bytes, hex.
    digest: String,
}

/// The DiLoCo section's description in the header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OuterMeta {
    /// blake3 of the outer momentum's little-endian bytes, hex.
    digest: String,
}

/// The JSON header: the run's metadata, plus the optimizer sections if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    #[serde(flatten)]
    meta: CheckpointMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    optim: Option<OptimMeta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outer: Option<OuterMeta>,
}

/// Why a checkpoint cannot go on with this node's run, whatever the model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RunMismatch {
    /// The run counts its rounds in periods of another length.
    #[error("the newest checkpoint in {dir} was written with --average-every {theirs}, not {ours}: pass --average-every {theirs} to resume it (the run counts its rounds in those periods)")]
    AverageEvery {
        /// The directory read.
        dir: String,
        /// The checkpoint's.
        theirs: u64,
        /// This node's.
        ours: u64,
    },
    /// The checkpoint belongs to another swarm.
    #[error("the newest checkpoint in {dir} is of swarm `{theirs}`, not `{ours}`: pass --swarm {theirs} to resume it, or another --resume directory")]
    Swarm {
        /// The directory read.
        dir: String,
        /// Its swarm.
        theirs: String,
        /// This node's swarm.
        ours: String,
    },
}

impl CheckpointMeta {
    /// Checks that the checkpoint (read from `dir`) belongs to a run of
    /// `swarm` averaging every `average_every` steps: another swarm's would
    /// mix runs in one directory, and another period numbers rounds
    /// differently. Files of older versions that record no period fit any.
    pub fn check_run(
        &self,
        dir: &Path,
        swarm: &str,
        average_every: u64,
    ) -> Result<(), RunMismatch> {
        let dir = || dir.display().to_string();
        if let Some(theirs) = self.average_every.filter(|e| *e != average_every) {
            return Err(RunMismatch::AverageEvery {
                dir: dir(),
                theirs,
                ours: average_every,
            });
        }
        if self.swarm != swarm {
            return Err(RunMismatch::Swarm {
                dir: dir(),
                theirs: self.swarm.clone(),
                ours: swarm.to_owned(),
            });
        }
        Ok(())
    }
}

/// What a checkpoint stores beside its metadata.
#[derive(Debug, Clone, Copy)]
pub struct State<'a> {
    /// Flat parameters.
    pub params: &'a [f32],
    /// The local (inner) optimizer's state, if any.
    pub optim: Option<&'a OptimState>,
    /// DiLoCo's outer momentum (one value per parameter), if the run uses it.
    pub outer_momentum: Option<&'a [f32]>,
}

/// A loaded, verified checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Progress and identity of the run.
    pub meta: CheckpointMeta,
    /// Flat parameters.
    pub params: Vec<f32>,
    /// The local optimizer's state, if the checkpoint holds one (format 2 and later).
    pub optim: Option<OptimState>,
    /// DiLoCo's outer momentum, if the run used it (format 3 and later).
    pub outer_momentum: Option<Vec<f32>>,
}

/// Checkpoint failures.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("checkpoint I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a valid checkpoint.
    #[error("{path} is not a valid checkpoint: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No checkpoint in the directory verifies.
    #[error("no valid checkpoint in {}{}", .0.display(), .1.as_ref().map(|why| format!(" (the newest: {why})")).unwrap_or_default())]
    NoneFound(PathBuf, Option<String>),
    /// The directory holds a verified checkpoint of the same swarm at a later
    /// round: an earlier run's, which pruning would weigh this one against.
    #[error(
        "{} holds a checkpoint of swarm `{swarm}` at round {newest}, past this one's round {round} \
         (an earlier run's?): not writing beside it, so nothing is pruned; resume that run with \
         --resume, or move its checkpoints away or pick another --checkpoint-dir",
        dir.display()
    )]
    Behind {
        /// The directory.
        dir: PathBuf,
        /// The swarm.
        swarm: String,
        /// Round of the newest verified checkpoint there.
        newest: u64,
        /// Round of the checkpoint not written.
        round: u64,
    },
    /// A fresh run (no `--resume` from this directory) was pointed at a
    /// directory holding a verified checkpoint of its swarm: writing there
    /// would prune or replace that run's checkpoints.
    #[error(
        "{} already holds checkpoints of swarm `{swarm}` (the newest of round {round}), an earlier \
         run's: pass --resume {} to go on with that run, or pick another --checkpoint-dir (or move \
         them away); a fresh run writing there would replace them",
        dir.display(),
        dir.display()
    )]
    EarlierRun {
        /// The directory.
        dir: PathBuf,
        /// The swarm.
        swarm: String,
        /// Round of the newest verified checkpoint there.
        round: u64,
    },
    /// A checkpoint directory was given that is a file.
    #[error("{0} is a file, not a checkpoint directory: pass the directory the checkpoints are in (`export` alone also takes one checkpoint file)")]
    NotADirectory(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Lower-case hex, as digests appear in reports and file names.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn params_bytes(params: &[f32]) -> Vec<u8> {
    p2ptrain_protocol::tensor::f32_le_bytes(params)
}

/// The parameter digest stored in checkpoints and reported by nodes (the
/// protocol's payload digest, in hex), so the two can be compared.
pub fn params_digest(params: &[f32]) -> String {
    hex(&p2ptrain_protocol::tensor::digest_f32(params))
}

fn optim_digest(optim: &OptimState) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&params_bytes(&optim.moment_1));
    h.update(&params_bytes(&optim.moment_2));
    hex(h.finalize().as_bytes())
}

fn encode(meta: &CheckpointMeta, state: State<'_>) -> Vec<u8> {
    let State {
        params,
        optim,
        outer_momentum,
    } = state;
    let header = Header {
        meta: meta.clone(),
        optim: optim.map(|o| OptimMeta {
            time: o.time,
            digest: optim_digest(o),
        }),
        outer: outer_momentum.map(|m| OuterMeta {
            digest: params_digest(m),
        }),
    };
    let header = serde_json::to_vec(&header).expect("checkpoint metadata always serialises");
    let mut out = Vec::with_capacity(16 + header.len() + params.len() * 12);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&params_bytes(params));
    if let Some(o) = optim {
        out.extend_from_slice(&params_bytes(&o.moment_1));
        out.extend_from_slice(&params_bytes(&o.moment_2));
    }
    if let Some(m) = outer_momentum {
        out.extend_from_slice(&params_bytes(m));
    }
    out
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A checkpoint's header and the body after it, from its first bytes (the
/// whole file, or as much as holds the header); the reason if they are not one.
fn split_header(bytes: &[u8]) -> Result<(Header, &[u8]), String> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err("missing the P2PTCKPT header".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "format version {version}, this build reads {OLDEST_READABLE} to {FORMAT_VERSION}; \
             resume with the p2ptrain version that wrote it"
        ));
    }
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if header_len > MAX_HEADER || 16 + header_len > bytes.len() {
        return Err(format!("header length {header_len} does not fit the file"));
    }
    let header =
        serde_json::from_slice(&bytes[16..16 + header_len]).map_err(|e| format!("header: {e}"))?;
    Ok((header, &bytes[16 + header_len..]))
}

/// More samples (or tokens) than any run trains on: a larger count in a
/// checkpoint was made up, and the run's own counting would overflow it.
const MAX_SAMPLES: u64 = 1 << 56;

fn decode(path: &Path, bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let (Header { meta, optim, outer }, body) = split_header(bytes).map_err(invalid)?;
    let max = crate::task::MAX_OPTIM_STEPS;
    if meta.round > max || meta.step > max {
        return Err(invalid(format!(
            "round {} and step {} are beyond any run (at most {max})",
            meta.round, meta.step
        )));
    }
    if meta.samples > MAX_SAMPLES {
        return Err(invalid(format!(
            "{} samples trained on are beyond any run (at most {MAX_SAMPLES})",
            meta.samples
        )));
    }
    // Parameters, then (with an optimizer section) two moment vectors of the
    // same length, then (with an outer section) the outer momentum.
    let sections = 1 + 2 * usize::from(optim.is_some()) + usize::from(outer.is_some());
    if !body.len().is_multiple_of(4 * sections) {
        return Err(invalid(format!(
            "body of {} bytes is not {sections} equal f32 sections",
            body.len()
        )));
    }
    let len = body.len() / sections;
    let params = f32s(&body[..len]);
    let optim = match optim {
        Some(o) => {
            let state = OptimState {
                time: o.time,
                moment_1: f32s(&body[len..2 * len]),
                moment_2: f32s(&body[2 * len..3 * len]),
            };
            if optim_digest(&state) != o.digest {
                return Err(invalid(
                    "optimizer state digest does not match the header".into(),
                ));
            }
            state
                .validate(params.len())
                .map_err(|e| invalid(e.to_string()))?;
            Some(state)
        }
        None => None,
    };
    let outer_momentum = match outer {
        Some(o) => {
            let m = f32s(&body[(sections - 1) * len..]);
            if params_digest(&m) != o.digest {
                return Err(invalid(
                    "outer momentum digest does not match the header".into(),
                ));
            }
            if let Some(i) = m.iter().position(|v| !v.is_finite()) {
                return Err(invalid(format!("outer momentum {i} is not finite")));
            }
            Some(m)
        }
        None => None,
    };
    if params_digest(&params) != meta.params_digest {
        return Err(invalid("parameter digest does not match the header".into()));
    }
    if let Some(i) = params.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!("parameter {i} is not finite")));
    }
    Ok(Checkpoint {
        meta,
        params,
        optim,
        outer_momentum,
    })
}

/// Writes a checkpoint without optimizer state into `dir` atomically and
/// prunes old ones; returns its path.
pub fn save(dir: &Path, meta: &CheckpointMeta, params: &[f32]) -> Result<PathBuf, CheckpointError> {
    save_with_optim(dir, meta, params, None)
}

/// Writes a checkpoint, with the local optimizer's state if given, into
/// `dir` atomically and prunes old ones; returns its path.
pub fn save_with_optim(
    dir: &Path,
    meta: &CheckpointMeta,
    params: &[f32],
    optim: Option<&OptimState>,
) -> Result<PathBuf, CheckpointError> {
    let state = State {
        params,
        optim,
        outer_momentum: None,
    };
    save_state(dir, meta, state)
}

/// Writes a checkpoint of `state` into `dir` atomically and prunes old
/// ones; returns its path.
pub fn save_state(
    dir: &Path,
    meta: &CheckpointMeta,
    state: State<'_>,
) -> Result<PathBuf, CheckpointError> {
    make_dir(dir)?;
    let bytes = encode(meta, state);
    let hash = blake3::hash(&bytes);
    let name = format!(
        "ckpt-r{:08}-{}.bin",
        meta.round,
        &hex(hash.as_bytes())[..32]
    );
    let path = dir.join(&name);
    let plan = plan_save(dir, meta, &path);
    if let Some(newest) = plan.newest.filter(|r| *r > meta.round) {
        return Err(CheckpointError::Behind {
            dir: dir.to_owned(),
            swarm: meta.swarm.clone(),
            newest,
            round: meta.round,
        });
    }
    // A failed write leaves no partial file, which would hold the very
    // space (a full disk, say) the next checkpoint needs.
    crate::small_file::write_atomically(&path, &bytes).map_err(io_err(&path))?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    for old in plan.retire {
        if let Err(e) = std::fs::remove_file(&old) {
            warn!(path = %old.display(), error = %e, "cannot delete an old checkpoint");
        }
    }
    remove_stale_temporaries(dir, std::time::SystemTime::now());
    Ok(path)
}

/// How old a checkpoint's temporary file must be to count as left by a
/// process killed mid-write: no honest write takes this long, so a slow one
/// of another process sharing the directory is never taken from under it
/// (and its process id may be another machine's, on shared storage).
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// Deletes checkpoint temporaries (`.ckpt-r….bin.<pid>.tmp`) older than
/// [`STALE_TEMPORARY`] from `dir`: a process killed while writing leaves one
/// of a whole checkpoint's size, which nothing else would ever remove.
fn remove_stale_temporaries(dir: &Path, now: std::time::SystemTime) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(".ckpt-r") && name.ends_with(".tmp")) {
            continue;
        }
        let stale = entry
            .metadata()
            .ok()
            .filter(std::fs::Metadata::is_file)
            .and_then(|m| m.modified().ok())
            .and_then(|at| now.duration_since(at).ok())
            .is_some_and(|age| age >= STALE_TEMPORARY);
        if stale {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    warn!(path = %entry.path().display(), "removed a checkpoint half-written by a process that was killed")
                }
                Err(e) => {
                    warn!(path = %entry.path().display(), error = %e, "cannot delete a stale checkpoint temporary")
                }
            }
        }
    }
}

/// Creates `dir` (and its parents) unless it exists, naming a file in its
/// place plainly rather than as the OS's "File exists".
fn make_dir(dir: &Path) -> Result<(), CheckpointError> {
    refuse_file(dir)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))
}

/// Names a file given where a checkpoint directory belongs.
fn refuse_file(dir: &Path) -> Result<(), CheckpointError> {
    if dir.exists() && !dir.is_dir() {
        return Err(CheckpointError::NotADirectory(dir.to_owned()));
    }
    Ok(())
}

/// Creates `dir` if needed and writes (then removes) a file in it, so a node
/// given a directory it cannot use says so before it trains, not at its
/// first checkpoint rounds later.
pub fn check_writable(dir: &Path) -> Result<(), CheckpointError> {
    make_dir(dir)?;
    let probe = dir.join(format!(".write-test-{}.tmp", std::process::id()));
    std::fs::write(&probe, b"").map_err(io_err(&probe))?;
    std::fs::remove_file(&probe).map_err(io_err(&probe))
}

/// Checkpoint files in `dir`, newest round first: regular files named as a
/// checkpoint (a pipe or device so named is no checkpoint, and opening a
/// pipe would block).
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(rest) = name
            .strip_prefix("ckpt-r")
            .and_then(|r| r.strip_suffix(".bin"))
        else {
            continue;
        };
        if let Some(round) = rest.split('-').next().and_then(|r| r.parse::<u64>().ok()) {
            found.push((round, path));
        }
    }
    found.sort_by(|a, b| b.cmp(a));
    Ok(found)
}

/// The directories right under `dir` that hold checkpoint files (a
/// testnet's `node-I`, one per node), sorted: where a user who named their
/// parent meant to look.
pub fn subdirectories_with_checkpoints(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && list(p).is_ok_and(|l| !l.is_empty()))
        .collect();
    found.sort();
    found
}

/// What saving a checkpoint of `swarm` in `dir` meets there.
#[derive(Debug, Default)]
struct SavePlan {
    /// The round of the swarm's newest checkpoint that verifies: one past
    /// the new checkpoint's round is an earlier run's, not to be written beside.
    newest: Option<u64>,
    /// The swarm's checkpoints to delete once the new one is written: those
    /// older than the newest `KEEP - 1` that verify (the new one makes
    /// `KEEP`).
    retire: Vec<PathBuf>,
}

// The newest verified checkpoint is always among those kept.
const _: () = assert!(KEEP >= 2);

/// Reads `dir` once for a save to `new` (left out if it is there already):
/// only checkpoints that verify count, so a damaged file (a truncated copy,
/// say) named with a later round neither pushes the good ones out nor is
/// deleted; one older than those kept goes with the rest. Checkpoints of
/// other swarms (a directory shared by mistake) are left alone. Verifying
/// reads the newest files whole, newest first, until `KEEP - 1` verify.
/// Another of the swarm's checkpoints of the same round and model that
/// verifies is superseded (the model a run ends on, written after that
/// round's own checkpoint), so no round has two valid files for a resume
/// to choose between.
fn plan_save(dir: &Path, new_meta: &CheckpointMeta, new: &Path) -> SavePlan {
    let swarm = new_meta.swarm.as_str();
    let mut plan = SavePlan::default();
    let mut kept = 0;
    let ours = list(dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, path)| path != new && swarm_of(path).as_deref() == Some(swarm));
    for (r, path) in ours {
        if r == new_meta.round {
            if load_file(&path).is_ok_and(|c| c.meta.model == new_meta.model) {
                plan.retire.push(path);
            }
        } else if kept == KEEP - 1 {
            plan.retire.push(path);
        } else if load_file(&path).is_ok() {
            plan.newest.get_or_insert(r);
            kept += 1;
        }
    }
    plan
}

/// The swarm named in a checkpoint's header, reading no more than a header.
fn swarm_of(path: &Path) -> Option<String> {
    meta_of(path).map(|m| m.swarm)
}

/// A checkpoint's metadata, reading no more than its header.
fn meta_of(path: &Path) -> Option<CheckpointMeta> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take((16 + MAX_HEADER) as u64)
        .read_to_end(&mut head)
        .ok()?;
    let (header, _) = split_header(&head).ok()?;
    Some(header.meta)
}

/// Reads and verifies one checkpoint file (its hash must match its name).
pub fn load_file(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let invalid = |reason: &str| CheckpointError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    };
    let bytes = crate::small_file::read_capped(path, MAX_CHECKPOINT_BYTES, "a p2ptrain checkpoint")
        .map_err(io_err(path))?;
    if !bytes.starts_with(MAGIC) {
        return Err(invalid("not a p2ptrain checkpoint (no P2PTCKPT header)"));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let want = name
        .strip_prefix("ckpt-r")
        .and_then(|n| n.strip_suffix(".bin"))
        .and_then(|n| n.rsplit_once('-'))
        .map(|(_, hash)| hash)
        .filter(|hash| hash.len() == 32)
        .ok_or_else(|| {
            invalid(
                "its name is not the ckpt-r<round>-<hash>.bin it was saved under, \
                 which carries the hash that verifies it; give it back that name",
            )
        })?;
    let got = hex(blake3::hash(&bytes).as_bytes());
    if !got.starts_with(want) {
        return Err(invalid(
            "content hash does not match the file name (truncated or altered)",
        ));
    }
    decode(path, &bytes)
}

/// Whether the file at `path` starts like a checkpoint (whether or not it
/// verifies): what `export --force` must never write over.
pub fn looks_like_checkpoint(path: &Path) -> bool {
    use std::io::Read;
    if !path.is_file() {
        return false; // a pipe would block the read
    }
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| &head == MAGIC)
}

/// The first of `paths` (newest first) that verifies; bad ones are skipped
/// with a warning, and the first one's fault is returned if none verifies.
fn first_that_verifies(
    paths: impl IntoIterator<Item = PathBuf>,
) -> Result<Checkpoint, Option<String>> {
    let mut newest_fault = None;
    for path in paths {
        match load_file(&path) {
            Ok(c) => return Ok(c),
            Err(e) => {
                warn!(error = %e, "skipping checkpoint");
                newest_fault.get_or_insert_with(|| e.to_string());
            }
        }
    }
    Err(newest_fault)
}

/// The newest checkpoint of `swarm` in `dir` that verifies (bad ones are
/// skipped with a warning), if `dir` holds one: a directory shared by
/// several swarms' runs resumes each from its own.
pub fn latest_of_swarm(dir: &Path, swarm: &str) -> Result<Option<Checkpoint>, CheckpointError> {
    refuse_file(dir)?;
    let ours = list(dir)?
        .into_iter()
        .map(|(_, path)| path)
        .filter(|path| match swarm_of(path) {
            Some(of) => of == swarm,
            None => {
                warn!(file = %path.display(), "skipping checkpoint: its header does not read as a checkpoint's");
                false
            }
        });
    Ok(first_that_verifies(ours).ok())
}

/// The newest checkpoint of `swarm` in `dir` that verifies or, where `dir`
/// holds none of that swarm, the newest of any (whose swarm the caller's
/// check then names, see [`CheckpointMeta::check_run`]).
pub fn load_latest_of(dir: &Path, swarm: &str) -> Result<Checkpoint, CheckpointError> {
    match latest_of_swarm(dir, swarm)? {
        Some(c) => Ok(c),
        None => load_latest(dir),
    }
}

/// Refuses a directory a fresh run of `swarm` would write its checkpoints
/// into while it holds a verified checkpoint of that swarm (an earlier
/// run's): pruning, and the checkpoint of the round a run ends on, would
/// replace that run's files. Said before the node trains, not at its first
/// checkpoint.
pub fn refuse_earlier_run(dir: &Path, swarm: &str) -> Result<(), CheckpointError> {
    if !dir.is_dir() {
        return Ok(());
    }
    match latest_of_swarm(dir, swarm)? {
        Some(c) => Err(CheckpointError::EarlierRun {
            dir: dir.to_owned(),
            swarm: swarm.to_owned(),
            round: c.meta.round,
        }),
        None => Ok(()),
    }
}

/// The swarm of the checkpoint file in `dir` written last among those whose
/// model name `model` accepts, with its time (headers only, nothing
/// verified): which run a directory that several runs wrote into holds most
/// recently.
pub fn last_written_swarm(
    dir: &Path,
    model: impl Fn(&str) -> bool,
) -> Option<(std::time::SystemTime, String)> {
    list(dir)
        .ok()?
        .into_iter()
        .filter_map(|(_, path)| {
            let meta = meta_of(&path).filter(|m| model(&m.model))?;
            let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
            Some((written, meta.swarm))
        })
        .max()
}

/// The newest checkpoint that verifies of the run that wrote last into
/// `dir` (its swarm's highest round), or of any run where that one has none
/// that verifies. What a user means by a directory's newest checkpoint when
/// several runs (a testnet run twice, each with a swarm of its own) share it:
/// by round alone, an earlier, longer run would win.
pub fn load_latest_of_last_run(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    refuse_file(dir)?;
    let last = last_written_swarm(dir, |_| true).map(|(_, swarm)| swarm);
    // That run's files first (newest first), then the others; each is tried,
    // and warned about if bad, once.
    let (ours, others): (Vec<PathBuf>, Vec<PathBuf>) = list(dir)?
        .into_iter()
        .map(|(_, path)| path)
        .partition(|path| last.is_some() && swarm_of(path) == last);
    first_that_verifies(ours.into_iter().chain(others))
        .map_err(|fault| CheckpointError::NoneFound(dir.to_owned(), fault))
}

/// The newest checkpoint in `dir` that verifies; bad ones are skipped with a warning.
pub fn load_latest(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    refuse_file(dir)?;
    let all = list(dir)?.into_iter().map(|(_, path)| path);
    first_that_verifies(all).map_err(|fault| CheckpointError::NoneFound(dir.to_owned(), fault))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(round: u64, params: &[f32]) -> CheckpointMeta {
        CheckpointMeta {
            swarm: "s".into(),
            model: "mlp".into(),
            round,
            step: round * 10,
            samples: round * 640,
            params_digest: params_digest(params),
            average_every: None,
        }
    }

    #[test]
    fn round_trip_and_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        for r in 1..=5u64 {
            let p = vec![r as f32; 100];
            save(dir.path(), &meta(r, &p), &p).unwrap();
        }
        let c = load_latest(dir.path()).unwrap();
        assert_eq!(c.meta.round, 5);
        assert_eq!(c.params, vec![5.0; 100]);
        // Only the newest KEEP survive.
        assert_eq!(list(dir.path()).unwrap().len(), KEEP);
    }

    #[test]
    fn temporaries_of_writers_killed_long_ago_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(".ckpt-r00000001-abcd.bin.4242.tmp");
        let fresh = dir.path().join(".ckpt-r00000002-abcd.bin.4243.tmp");
        let other = dir.path().join(".notes.tmp");
        for f in [&old, &fresh, &other] {
            std::fs::write(f, b"half a checkpoint").unwrap();
        }
        let hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 3600);
        for f in [&old, &other] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(hours_ago)
                .unwrap();
        }
        let p = vec![1.0f32; 4];
        save(dir.path(), &meta(3, &p), &p).unwrap();
        assert!(!old.exists(), "a stale temporary was left");
        assert!(
            fresh.exists(),
            "a write that may still be going on was removed"
        );
        assert!(other.exists(), "a file that is no checkpoint's was removed");
    }

    #[test]
    fn a_second_checkpoint_of_a_round_supersedes_the_first() {
        let dir = tempfile::tempdir().unwrap();
        for (r, v) in [(1u64, 1.0f32), (2, 2.0), (2, 3.0)] {
            let p = vec![v; 16];
            save(dir.path(), &meta(r, &p), &p).unwrap();
        }
        // Either round-2 file could sort first; only the later one is left.
        assert_eq!(list(dir.path()).unwrap().len(), 2);
        assert_eq!(load_latest(dir.path()).unwrap().params, vec![3.0; 16]);
        // Saving the same bytes again keeps the one file.
        let p = vec![3.0f32; 16];
        save(dir.path(), &meta(2, &p), &p).unwrap();
        assert_eq!(list(dir.path()).unwrap().len(), 2);
        // Another model's checkpoint of that round (another pipeline
        // stage's, in a shared directory) is not superseded.
        let stage = CheckpointMeta {
            model: "char-lm/stage-1-of-2".into(),
            ..meta(2, &p)
        };
        save(dir.path(), &stage, &p).unwrap();
        assert_eq!(list(dir.path()).unwrap().len(), 3);
    }

    #[test]
    fn pruning_leaves_other_swarms_checkpoints_alone() {
        let dir = tempfile::tempdir().unwrap();
        let theirs = |r: u64| CheckpointMeta {
            swarm: "other".into(),
            ..meta(r, &[0.0])
        };
        for r in 1..=2u64 {
            save(dir.path(), &theirs(r), &[0.0]).unwrap();
        }
        std::fs::write(dir.path().join("ckpt-r00000000-00.bin"), b"not ours").unwrap();
        for r in 3..=(3 + KEEP as u64) {
            save(dir.path(), &meta(r, &[1.0]), &[1.0]).unwrap();
        }
        let swarms: Vec<Option<String>> = list(dir.path())
            .unwrap()
            .iter()
            .map(|(_, p)| swarm_of(p))
            .collect();
        let count = |s: Option<&str>| swarms.iter().filter(|x| x.as_deref() == s).count();
        assert_eq!(count(Some("s")), KEEP);
        assert_eq!(count(Some("other")), 2);
        assert_eq!(count(None), 1, "an unreadable file was deleted");
    }

    #[test]
    fn corrupt_or_truncated_newest_falls_back_to_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let good = vec![1.5f32; 64];
        save(dir.path(), &meta(1, &good), &good).unwrap();
        let newer = vec![2.5f32; 64];
        let path = save(dir.path(), &meta(2, &newer), &newer).unwrap();
        // A kill mid-write can leave only a temporary file: ignored.
        std::fs::write(dir.path().join(".ckpt-r00000003-ab.bin.tmp"), b"P2PT").unwrap();
        // Flip one byte of the newest checkpoint.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let c = load_latest(dir.path()).unwrap();
        assert_eq!(c.meta.round, 1);
        assert_eq!(c.params, good);
        // Truncate it instead: same result.
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(load_latest(dir.path()).unwrap().meta.round, 1);
    }

    #[test]
    fn forged_file_with_matching_name_is_still_checked_inside() {
        let dir = tempfile::tempdir().unwrap();
        let p = vec![1.0f32; 8];
        let mut m = meta(7, &p);
        m.params_digest = "00".repeat(32);
        let bytes = encode(
            &m,
            State {
                params: &p,
                optim: None,
                outer_momentum: None,
            },
        );
        let name = format!(
            "ckpt-r00000007-{}.bin",
            &hex(blake3::hash(&bytes).as_bytes())[..32]
        );
        std::fs::write(dir.path().join(name), bytes).unwrap();
        let err = load_latest(dir.path()).unwrap_err();
        assert!(matches!(err, CheckpointError::NoneFound(..)), "{err}");
    }

    #[test]
    fn outer_momentum_round_trips_beside_adam_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = vec![0.5f32; 16];
        let m: Vec<f32> = (0..16).map(|i| i as f32 * 0.125).collect();
        let a = adam(16, 3);
        let state = State {
            params: &p,
            optim: Some(&a),
            outer_momentum: Some(&m),
        };
        let path = save_state(dir.path(), &meta(1, &p), state).unwrap();
        let c = load_latest(dir.path()).unwrap();
        assert_eq!(c.params, p);
        assert_eq!(c.optim, Some(a.clone()));
        assert_eq!(c.outer_momentum, Some(m.clone()));
        // Without Adam the momentum follows the parameters directly.
        let dir2 = tempfile::tempdir().unwrap();
        let state = State {
            params: &p,
            optim: None,
            outer_momentum: Some(&m),
        };
        save_state(dir2.path(), &meta(1, &p), state).unwrap();
        let c = load_latest(dir2.path()).unwrap();
        assert_eq!((c.optim, c.outer_momentum), (None, Some(m)));
        // A checkpoint without DiLoCo says so.
        save(dir2.path(), &meta(2, &p), &p).unwrap();
        assert_eq!(load_latest(dir2.path()).unwrap().outer_momentum, None);
        // Damage inside the momentum (file renamed to its new hash) is caught by its digest.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let err = decode(&path, &bytes).unwrap_err();
        assert!(err.to_string().contains("outer momentum"), "{err}");
    }

    fn adam(n: usize, time: u64) -> OptimState {
        OptimState {
            time,
            moment_1: (0..n).map(|i| i as f32 * -0.5).collect(),
            moment_2: (0..n).map(|i| i as f32 * 0.25).collect(),
        }
    }

    #[test]
    fn optimizer_state_round_trips_and_damage_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = vec![0.5f32; 32];
        save_with_optim(dir.path(), &meta(1, &p), &p, Some(&adam(32, 10))).unwrap();
        let newer = vec![0.75f32; 32];
        let path =
            save_with_optim(dir.path(), &meta(2, &newer), &newer, Some(&adam(32, 20))).unwrap();
        let c = load_latest(dir.path()).unwrap();
        assert_eq!((c.meta.round, c.params.clone()), (2, newer));
        assert_eq!(c.optim, Some(adam(32, 20)));
        // A flipped byte in the second moments: that file is refused, the
        // previous one (with its own optimizer state) is used.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 5;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = load_file(&path).unwrap_err().to_string();
        assert!(err.contains("content hash"), "{err}");
        let c = load_latest(dir.path()).unwrap();
        assert_eq!((c.meta.round, c.optim), (1, Some(adam(32, 10))));
    }

    #[test]
    fn forged_optimizer_section_is_checked_inside() {
        let dir = tempfile::tempdir().unwrap();
        let p = vec![1.0f32; 4];
        let mut bad = adam(4, 3);
        bad.moment_2[1] = -2.0; // no Adam ever holds a negative second moment
        let path = save_with_optim(dir.path(), &meta(1, &p), &p, Some(&bad)).unwrap();
        let err = load_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("second moment 1 is not finite or is negative"),
            "{err}"
        );
        // A made-up step count overflowed Adam's counter on the next step.
        let p2 = vec![1.0f32; 4];
        let ancient = adam(4, u64::MAX);
        let path = save_with_optim(dir.path(), &meta(3, &p2), &p2, Some(&ancient)).unwrap();
        let err = load_file(&path).unwrap_err().to_string();
        assert!(err.contains("more than any run takes"), "{err}");
        let mut short = adam(3, 3);
        short.moment_1.push(0.0);
        short.moment_2.push(0.0);
        let state = State {
            params: &p[..3],
            optim: Some(&short),
            outer_momentum: None,
        };
        let bytes = encode(&meta(2, &p), state);
        let name = format!(
            "ckpt-r00000002-{}.bin",
            &hex(blake3::hash(&bytes).as_bytes())[..32]
        );
        std::fs::write(dir.path().join(&name), &bytes).unwrap();
        let err = load_file(&dir.path().join(name)).unwrap_err().to_string();
        assert!(err.contains("equal f32 sections"), "{err}");
    }

    #[test]
    fn version_1_files_still_load_without_optimizer_state() {
        let dir = tempfile::tempdir().unwrap();
        let p = vec![2.0f32; 16];
        // A version-1 file: the header is the bare metadata, the body the parameters.
        let mut bytes = Vec::new();
        let header = serde_json::to_vec(&meta(4, &p)).unwrap();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&params_bytes(&p));
        let name = format!(
            "ckpt-r00000004-{}.bin",
            &hex(blake3::hash(&bytes).as_bytes())[..32]
        );
        std::fs::write(dir.path().join(name), &bytes).unwrap();
        let c = load_latest(dir.path()).unwrap();
        assert_eq!((c.meta.round, c.params, c.optim), (4, p.clone(), None));
        // A future version is refused by name.
        let future = FORMAT_VERSION + 1;
        bytes[8..12].copy_from_slice(&future.to_le_bytes());
        let err = decode(Path::new("x.bin"), &bytes).unwrap_err().to_string();
        assert!(err.contains(&format!("format version {future}")), "{err}");
    }

    #[test]
    fn unusable_directories_are_named_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        check_writable(&nested).unwrap();
        assert!(nested.is_dir());
        assert_eq!(
            std::fs::read_dir(&nested).unwrap().count(),
            0,
            "probe left behind"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_writable(&file).unwrap_err();
        assert!(matches!(err, CheckpointError::NotADirectory(_)), "{err}");
        assert!(err.to_string().contains("is a file"), "{err}");
        let state = State {
            params: &[1.0],
            optim: None,
            outer_momentum: None,
        };
        let err = save_state(&file, &meta(1, &[1.0]), state).unwrap_err();
        assert!(matches!(err, CheckpointError::NotADirectory(_)), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn empty_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_latest(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no valid checkpoint"), "{err}");
    }

    #[test]
    fn with_no_valid_checkpoint_the_error_says_what_is_wrong_with_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = save(dir.path(), &meta(4, &[1.0]), &[1.0]).unwrap();
        std::fs::write(&path, b"P2PTCKPT").unwrap();
        let err = load_latest(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("no valid checkpoint") && err.contains("content hash does not match"),
            "{err}"
        );
    }

    #[test]
    fn damaged_copies_with_later_rounds_do_not_push_good_checkpoints_out() {
        let dir = tempfile::tempdir().unwrap();
        let good = save(dir.path(), &meta(6, &[6.0]), &[6.0]).unwrap();
        // Truncated copies under later rounds' names: headers readable,
        // bodies gone.
        let bytes = std::fs::read(&good).unwrap();
        for r in 8..=10u64 {
            let name = format!("ckpt-r{r:08}-{}.bin", "0".repeat(32));
            std::fs::write(dir.path().join(name), &bytes[..bytes.len() - 2]).unwrap();
        }
        for r in 7..=8u64 {
            save(dir.path(), &meta(r, &[r as f32]), &[r as f32]).unwrap();
        }
        let rounds: Vec<u64> = list(dir.path())
            .unwrap()
            .iter()
            .filter(|(_, p)| load_file(p).is_ok())
            .map(|(r, _)| *r)
            .collect();
        assert_eq!(rounds, [8, 7, 6], "the good checkpoints were pruned");
        assert_eq!(list(dir.path()).unwrap().len(), 6, "damaged files stay");
        // A fourth good one retires the oldest good one, not a damaged file.
        save(dir.path(), &meta(9, &[9.0]), &[9.0]).unwrap();
        assert!(!good.exists());
        assert_eq!(list(dir.path()).unwrap().len(), 6);
        let new = dir.path().join("new");
        assert_eq!(plan_save(dir.path(), &meta(10, &[]), &new).newest, Some(9));
        let other = CheckpointMeta {
            swarm: "other".into(),
            ..meta(10, &[])
        };
        assert_eq!(plan_save(dir.path(), &other, &new).newest, None);
    }

    #[test]
    fn a_checkpoint_behind_a_verified_one_of_its_swarm_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        // An earlier run's checkpoints, rounds 20 to 22.
        for r in 20..=22u64 {
            save(dir.path(), &meta(r, &[r as f32]), &[r as f32]).unwrap();
        }
        // A new run's round 1 used to be written, then pruned at once.
        let err = save(dir.path(), &meta(1, &[1.0]), &[1.0]).unwrap_err();
        assert!(
            matches!(
                err,
                CheckpointError::Behind {
                    newest: 22,
                    round: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("--resume"), "{err}");
        let rounds: Vec<u64> = list(dir.path()).unwrap().iter().map(|(r, _)| *r).collect();
        assert_eq!(rounds, [22, 21, 20]);
        // The same round (a restarted node's), later ones, and other swarms are written.
        save(dir.path(), &meta(22, &[2.0]), &[2.0]).unwrap();
        save(dir.path(), &meta(23, &[3.0]), &[3.0]).unwrap();
        let other = CheckpointMeta {
            swarm: "other".into(),
            ..meta(1, &[1.0])
        };
        save(dir.path(), &other, &[1.0]).unwrap();
    }

    #[test]
    fn a_fresh_run_is_refused_a_directory_holding_its_swarms_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-yet");
        refuse_earlier_run(&missing, "s").unwrap();
        refuse_earlier_run(dir.path(), "s").unwrap();
        // Another swarm's, and a damaged one of ours, are no earlier run to keep.
        let other = CheckpointMeta {
            swarm: "other".into(),
            ..meta(3, &[3.0])
        };
        save(dir.path(), &other, &[3.0]).unwrap();
        let damaged = save(dir.path(), &meta(2, &[2.0]), &[2.0]).unwrap();
        std::fs::write(&damaged, b"P2PTCKPT truncated").unwrap();
        refuse_earlier_run(dir.path(), "s").unwrap();
        // A verified one of ours is: a run ending at its round would replace it.
        save(dir.path(), &meta(47, &[4.7]), &[4.7]).unwrap();
        let err = refuse_earlier_run(dir.path(), "s").unwrap_err();
        assert!(
            matches!(err, CheckpointError::EarlierRun { round: 47, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("--resume") && text.contains("`s`"), "{text}");
        refuse_earlier_run(dir.path(), "other2").unwrap();
    }

    #[test]
    fn each_swarm_resumes_its_own_newest_from_a_shared_directory() {
        let dir = tempfile::tempdir().unwrap();
        let of = |swarm: &str, round: u64| CheckpointMeta {
            swarm: swarm.into(),
            ..meta(round, &[round as f32])
        };
        save(dir.path(), &of("b", 19), &[19.0]).unwrap();
        save(dir.path(), &of("a", 50), &[50.0]).unwrap();
        save(dir.path(), &of("b", 20), &[20.0]).unwrap();
        let b = load_latest_of(dir.path(), "b").unwrap();
        assert_eq!((b.meta.swarm.as_str(), b.meta.round), ("b", 20));
        assert_eq!(b.params, [20.0]);
        assert_eq!(load_latest_of(dir.path(), "a").unwrap().meta.round, 50);
        // None of the swarm: the newest of any, whose swarm the caller names.
        let c = load_latest_of(dir.path(), "c").unwrap();
        assert_eq!((c.meta.swarm.as_str(), c.meta.round), ("a", 50));
        assert!(c.meta.check_run(dir.path(), "c", 10).is_err());
    }

    #[test]
    fn the_swarm_written_last_is_told_by_file_times() {
        let dir = tempfile::tempdir().unwrap();
        let any = |_: &str| true;
        assert_eq!(last_written_swarm(dir.path(), any), None);
        let at = |secs| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        // Swarm "a" has the higher round, "b" wrote last.
        for (swarm, round, written) in [("b", 3, 2_000), ("a", 9, 1_000)] {
            let m = CheckpointMeta {
                swarm: swarm.into(),
                ..meta(round, &[1.0])
            };
            let path = save(dir.path(), &m, &[1.0]).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(at(written)).unwrap();
        }
        assert_eq!(
            last_written_swarm(dir.path(), any),
            Some((at(2_000), "b".into()))
        );
        // Only among the models asked for.
        assert_eq!(last_written_swarm(dir.path(), |m| m == "cnn"), None);
    }

    #[test]
    fn the_newest_checkpoint_of_a_shared_directory_is_that_of_the_last_run() {
        let dir = tempfile::tempdir().unwrap();
        let at = |secs| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        // An earlier, longer run "old" ended on round 20; "new" wrote last.
        for (swarm, round, written) in [("old", 20, 1_000), ("new", 12, 1_500), ("new", 16, 2_000)]
        {
            let m = CheckpointMeta {
                swarm: swarm.into(),
                ..meta(round, &[round as f32])
            };
            let path = save(dir.path(), &m, &[round as f32]).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(at(written)).unwrap();
        }
        let c = load_latest_of_last_run(dir.path()).unwrap();
        assert_eq!((c.meta.swarm.as_str(), c.meta.round), ("new", 16));
        assert_eq!(load_latest(dir.path()).unwrap().meta.round, 20);
    }

    #[test]
    fn a_failed_write_leaves_no_partial_file_behind() {
        let params = [1.0f32, 2.0];
        let scratch = tempfile::tempdir().unwrap();
        let name = save(scratch.path(), &meta(5, &params), &params)
            .unwrap()
            .file_name()
            .unwrap()
            .to_owned();
        // A directory where the file goes makes the final rename fail after
        // the whole temporary file was written.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(&name).join("in-the-way")).unwrap();
        save(dir.path(), &meta(5, &params), &params).unwrap_err();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [name]);
    }

    #[test]
    fn a_made_up_sample_count_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let huge = CheckpointMeta {
            samples: u64::MAX,
            ..meta(1, &[1.0])
        };
        let path = save(dir.path(), &huge, &[1.0]).unwrap();
        let err = load_file(&path).unwrap_err();
        assert!(err.to_string().contains("samples"), "{err}");
    }

    #[test]
    fn non_checkpoints_renamed_files_and_non_files_are_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = save(dir.path(), &meta(1, &[1.0]), &[1.0]).unwrap();
        let renamed = dir.path().join("best.bin");
        std::fs::copy(&path, &renamed).unwrap();
        let err = load_file(&renamed).unwrap_err().to_string();
        assert!(err.contains("give it back that name"), "{err}");
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "hello").unwrap();
        let err = load_file(&text).unwrap_err().to_string();
        assert!(err.contains("not a p2ptrain checkpoint"), "{err}");
        let err = load_file(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("a directory, not a p2ptrain checkpoint"),
            "{err}"
        );
        #[cfg(unix)]
        {
            let err = load_file(Path::new("/dev/zero")).unwrap_err().to_string();
            assert!(err.contains("a device"), "{err}");
            // A pipe or device named like a checkpoint is not listed (a pipe
            // would block the reader), so the good one still loads.
            let fifo = dir
                .path()
                .join(format!("ckpt-r00000099-{}.bin", "0".repeat(32)));
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            assert!(made.is_ok_and(|s| s.success()));
            std::os::unix::fs::symlink(
                "/dev/zero",
                dir.path()
                    .join(format!("ckpt-r00000098-{}.bin", "1".repeat(32))),
            )
            .unwrap();
            assert_eq!(load_latest(dir.path()).unwrap().meta.round, 1);
        }
    }
}
