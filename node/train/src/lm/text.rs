//! Text for the character-level language model: bytes, windows, shards.
//!
//! Tokens are UTF-8 bytes (a vocabulary of 256), so every peer agrees on the
//! vocabulary whatever file it reads and no vocabulary has to travel. The
//! last tenth of the text is held out for validation.

use crate::task::Shard;
use p2ptrain_protocol::rng::Rng;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The bundled default text (see `data/austen/README.md`).
const BUNDLED: &[u8] = include_bytes!("../../data/austen/pride_and_prejudice_part.txt.gz");
/// Fraction of the text held out for validation (its end).
const HELD_OUT: f64 = 0.1;
/// Largest text file read (bytes), so a wrong path cannot exhaust memory.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Why a text could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is UTF-8 but mostly control bytes: binary data, not text.
    #[error("{} is not text: {percent}% of its bytes are control characters (other than newlines and tabs)", path.display())]
    NotText {
        /// The file.
        path: PathBuf,
        /// Share of control bytes, in percent.
        percent: u64,
    },
    /// The file is not UTF-8 text.
    #[error("{} is not UTF-8 text (invalid byte at offset {offset}); convert it to UTF-8 first", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Where decoding failed.
        offset: usize,
    },
    /// The text has too few bytes for even one training and one validation window.
    #[error("{} has {bytes} bytes; the language model needs at least {needed} (one window of {context} characters each for training and validation)", path.display())]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: usize,
        /// The minimum.
        needed: usize,
        /// The model's context.
        context: usize,
    },
    /// The file is larger than [`MAX_TEXT_BYTES`].
    #[error("{} is larger than {MAX_TEXT_BYTES} bytes; use a smaller excerpt", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
}

/// A text split into a training part and a held-out part.
#[derive(Debug, Clone, PartialEq)]
pub struct TextData {
    bytes: Vec<u8>,
    split: usize,
    /// Where the text came from, for messages.
    pub source: String,
}

/// The bundled Austen excerpt.
pub fn load_bundled() -> Result<TextData, TextError> {
    let name = PathBuf::from("bundled pride_and_prejudice_part.txt.gz");
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(BUNDLED)
        .read_to_end(&mut bytes)
        .map_err(|source| TextError::Io {
            path: name.clone(),
            source,
        })?;
    TextData::new(bytes, &name)
}

/// Any UTF-8 text file, gzipped or not (told by its content, every member
/// of a gzip stream read, as `zcat` does).
pub fn load_file(path: &Path) -> Result<TextData, TextError> {
    let io = |source| TextError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Checked before opening: a named pipe would block.
    if crate::files::check_regular(path, "a UTF-8 text file")
        .map_err(io)?
        .len()
        > MAX_TEXT_BYTES
    {
        return Err(TextError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let mut raw = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TEXT_BYTES + 1).read_to_end(&mut raw))
        .map_err(io)?;
    let bytes = if crate::files::is_gzip(&raw) {
        crate::files::gunzip_capped(&raw, MAX_TEXT_BYTES).map_err(io)?
    } else {
        raw
    };
    if bytes.len() as u64 > MAX_TEXT_BYTES {
        return Err(TextError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    TextData::new(bytes, path)
}

impl TextData {
    /// Checks `bytes` are UTF-8 and splits off the held-out tail.
    pub fn new(bytes: Vec<u8>, path: &Path) -> Result<TextData, TextError> {
        if let Err(e) = std::str::from_utf8(&bytes) {
            return Err(TextError::NotUtf8 {
                path: path.to_path_buf(),
                offset: e.valid_up_to(),
            });
        }
        let control = bytes
            .iter()
            .filter(|b| b.is_ascii_control() && !matches!(b, b'\n' | b'\r' | b'\t'))
            .count();
        // Real text has next to none; a zero-filled or binary file that
        // happens to be valid UTF-8 is mostly that.
        if control * 10 > bytes.len() {
            return Err(TextError::NotText {
                path: path.to_path_buf(),
                percent: (control * 100 / bytes.len()) as u64,
            });
        }
        let split = bytes.len() - (bytes.len() as f64 * HELD_OUT) as usize;
        Ok(TextData {
            bytes,
            split,
            source: path.display().to_string(),
        })
    }

    /// Checks both parts hold at least one window of `context + 1` bytes.
    pub fn check_context(&self, context: usize) -> Result<(), TextError> {
        if self.train_windows(context) == 0 || self.eval_windows(context) == 0 {
            return Err(TextError::TooShort {
                path: PathBuf::from(&self.source),
                bytes: self.bytes.len(),
                needed: ((context + 1) as f64 / HELD_OUT).ceil() as usize,
                context,
            });
        }
        Ok(())
    }

    /// Training windows: consecutive `context + 1`-byte windows overlapping
    /// by one byte, so every training byte is predicted once per epoch.
    pub fn train_windows(&self, context: usize) -> usize {
        self.split.saturating_sub(1) / context.max(1)
    }

    /// Held-out windows, laid out like the training ones.
    pub fn eval_windows(&self, context: usize) -> usize {
        (self.bytes.len() - self.split).saturating_sub(1) / context.max(1)
    }

    /// Training window `index` as token ids.
    pub fn train_window(&self, index: usize, context: usize) -> &[u8] {
        let start = index * context;
        &self.bytes[start..start + context + 1]
    }

    /// Held-out window `index` as token ids.
    pub fn eval_window(&self, index: usize, context: usize) -> &[u8] {
        let start = self.split + index * context;
        &self.bytes[start..start + context + 1]
    }

    /// The whole text (for prompts and tests).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A digest of the text: pipeline peers cut it into the same windows, so
    /// they must hold the same text.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("p2ptrain 2026 char-lm text");
        h.update(&self.bytes);
        *h.finalize().as_bytes()
    }
}

/// Walks this peer's shard of training windows in a fresh seeded order each epoch.
#[derive(Debug, Clone)]
pub struct WindowSampler {
    shard: Vec<u64>,
    /// The shard's seed, to tell the same shard handed over again.
    seed: u64,
    /// Shards this sampler took before this one (see [`WindowSampler::reshard`]).
    reshards: u64,
    order: Vec<u64>,
    next: usize,
    rng: Rng,
}

impl WindowSampler {
    /// All `windows` windows, shuffled with `seed`.
    pub fn new(windows: usize, seed: u64) -> Self {
        Self::for_shard(Shard {
            indices: (0..windows as u64).collect(),
            seed,
            peers: 1,
        })
    }

    /// This peer's shard.
    pub fn for_shard(shard: Shard) -> Self {
        WindowSampler {
            order: Vec::new(),
            next: 0,
            rng: Rng::new(shard.seed),
            seed: shard.seed,
            reshards: 0,
            shard: shard.indices,
        }
    }

    /// Takes `shard` from now on. The shard already held goes on where its
    /// pass stands (handed over again after a membership change that changed
    /// nothing for it); a new one starts with an order drawn from its seed and
    /// the number of shards taken before, so it does not replay the order a
    /// first shard of those indices would get.
    pub fn reshard(&mut self, shard: Shard) {
        if shard.indices == self.shard && shard.seed == self.seed {
            return;
        }
        let reshards = self.reshards.wrapping_add(1);
        *self = WindowSampler {
            rng: Rng::new(shard.seed ^ reshards.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            reshards,
            ..WindowSampler::for_shard(shard)
        };
    }

    /// Moves the order on by `draws` windows, exactly as that many
    /// [`WindowSampler::next_index`] calls would (a resumed first stage goes
    /// on where its passes stood); returns the draws moved past (0 for an
    /// empty shard). Whole passes past the current one only advance the
    /// shuffle, without walking their windows.
    pub fn skip(&mut self, draws: u64) -> u64 {
        let len = self.shard.len() as u64;
        if len == 0 {
            return 0;
        }
        let left_in_pass = (self.order.len() - self.next) as u64;
        if draws <= left_in_pass {
            self.next += draws as usize;
            return draws;
        }
        let beyond = draws - left_in_pass;
        // Passes begun after the current one; the last of them is kept.
        let passes = beyond.div_ceil(len);
        for _ in 0..passes {
            self.shuffle();
        }
        self.next = (beyond - (passes - 1) * len) as usize;
        draws
    }

    /// Starts a new pass: the shard in an order drawn from the sampler's rng.
    fn shuffle(&mut self) {
        self.order.clone_from(&self.shard);
        for i in (1..self.order.len()).rev() {
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
        self.next = 0;
    }

    /// The next window index; `None` only for an empty shard.
    pub fn next_index(&mut self) -> Option<u64> {
        if self.shard.is_empty() {
            return None;
        }
        if self.next >= self.order.len() {
            self.shuffle();
        }
        let i = self.order[self.next];
        self.next += 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_text_is_the_documented_excerpt() {
        let t = load_bundled().unwrap();
        assert_eq!(t.bytes().len(), 399_932);
        assert!(t.bytes().starts_with(b"PRIDE AND PREJUDICE"));
        assert!(t.train_windows(128) > 2500);
        assert!(t.eval_windows(128) > 250);
        assert_eq!(t.train_window(1, 128)[0], t.train_window(0, 128)[128]);
    }

    #[test]
    fn bad_files_get_errors_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = load_file(&dir.path().join("nope.txt")).unwrap_err();
        assert!(missing.to_string().contains("nope.txt"), "{missing}");
        let zeros = dir.path().join("zeros.txt");
        std::fs::write(&zeros, vec![0u8; 5000]).unwrap();
        let e = load_file(&zeros).unwrap_err();
        assert!(matches!(e, TextError::NotText { percent: 100, .. }), "{e}");
        let latin1 = dir.path().join("latin1.txt");
        std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
        let e = load_file(&latin1).unwrap_err();
        assert!(matches!(e, TextError::NotUtf8 { offset: 3, .. }), "{e}");
        let short = dir.path().join("short.txt");
        std::fs::write(&short, "too short").unwrap();
        let t = load_file(&short).unwrap();
        let e = t.check_context(128).unwrap_err();
        assert!(e.to_string().contains("at least"), "{e}");
        let e = load_file(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("a directory, not a UTF-8 text file"),
            "{e}"
        );
        #[cfg(unix)]
        {
            // A pipe blocked the node forever on opening it.
            let fifo = dir.path().join("pipe.txt");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            assert!(made.is_ok_and(|s| s.success()));
            let e = load_file(&fifo).unwrap_err();
            assert!(
                e.to_string()
                    .contains("a named pipe, not a UTF-8 text file"),
                "{e}"
            );
        }
    }

    #[test]
    fn gzipped_text_is_told_by_content_and_read_whole() {
        use std::io::Write;
        let gzip = |text: &[u8]| {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(text).unwrap();
            enc.finish().unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        // Two gzip members (as `cat a.gz b.gz` makes), under a name without `.gz`.
        let mut two = gzip(b"It is a truth universally acknowledged, ");
        two.extend(gzip(b"that a single man in possession of a good fortune"));
        let path = dir.path().join("austen.txt");
        std::fs::write(&path, &two).unwrap();
        let t = load_file(&path).unwrap();
        assert_eq!(
            t.bytes,
            b"It is a truth universally acknowledged, that a single man in possession of a good fortune"
        );
    }

    #[test]
    fn sampler_visits_every_shard_window_once_per_epoch() {
        let mut s = WindowSampler::for_shard(Shard {
            indices: vec![3, 5, 8, 13],
            seed: 9,
            peers: 2,
        });
        let mut seen: Vec<u64> = (0..4).map(|_| s.next_index().unwrap()).collect();
        seen.sort();
        assert_eq!(seen, vec![3, 5, 8, 13]);
        assert!(WindowSampler::new(0, 1).next_index().is_none());
    }

    #[test]
    fn the_same_shard_again_goes_on_with_its_epoch() {
        let shard = |indices: Vec<u64>| Shard {
            indices,
            seed: 9,
            peers: 2,
        };
        let mut s = WindowSampler::for_shard(shard(vec![3, 5, 8, 13]));
        let mut seen = vec![s.next_index().unwrap()];
        // Handed over again after a membership change that changed nothing
        // for it: the epoch goes on.
        s.reshard(shard(vec![3, 5, 8, 13]));
        seen.extend((0..3).map(|_| s.next_index().unwrap()));
        seen.sort();
        assert_eq!(seen, vec![3, 5, 8, 13], "one epoch, each window once");
        // A new shard gets an order of its own, not a first shard's.
        let first = |s: &mut WindowSampler| (0..4).map(|_| s.next_index().unwrap()).collect();
        let mut fresh = WindowSampler::for_shard(shard((0..64).collect()));
        let fresh_order: Vec<u64> = first(&mut fresh);
        s.reshard(shard((0..64).collect()));
        let order: Vec<u64> = first(&mut s);
        assert_ne!(order, fresh_order);
    }

    #[test]
    fn skipping_draws_lands_where_drawing_them_would() {
        let shard = || Shard {
            indices: vec![2, 4, 6, 8, 10, 12, 14],
            seed: 5,
            peers: 3,
        };
        for (drawn_first, skipped) in [(0, 0), (0, 3), (2, 5), (3, 4), (1, 20), (0, 21), (6, 15)] {
            let mut drawn = WindowSampler::for_shard(shard());
            let mut skipping = WindowSampler::for_shard(shard());
            for _ in 0..drawn_first {
                assert_eq!(drawn.next_index(), skipping.next_index());
            }
            for _ in 0..skipped {
                drawn.next_index();
            }
            skipping.skip(skipped);
            let next = |s: &mut WindowSampler| (0..10).map(|_| s.next_index()).collect::<Vec<_>>();
            assert_eq!(
                next(&mut skipping),
                next(&mut drawn),
                "{drawn_first} drawn, then {skipped} skipped"
            );
        }
        let mut empty = WindowSampler::new(0, 1);
        assert_eq!(empty.skip(10), 0);
        assert!(empty.next_index().is_none());
    }
}
