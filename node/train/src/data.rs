//! MNIST in its original IDX format: a strict reader and the bundled subset.
//!
//! Data files come from users' disks, so every header field is checked and
//! every failure names the file. Gzip is detected by its magic bytes, not by
//! the file name, since people rename files.

use std::io::Read;
use std::path::{Path, PathBuf};

use std::borrow::Cow;

use super::TrainError;

/// Side of an MNIST image in pixels; the models assume 28x28 inputs.
pub const IMAGE_SIDE: usize = 28;
/// Pixels per image, the length of one flattened input row.
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
/// Digit classes, the width of the models' output.
pub const NUM_CLASSES: usize = 10;
/// Mean pixel intensity of MNIST's training set (after scaling to [0, 1]), used to centre inputs.
pub const PIXEL_MEAN: f32 = 0.1307;
/// Standard deviation of MNIST's training pixels (after scaling to [0, 1]), used to scale inputs.
pub const PIXEL_STD: f32 = 0.3081;

/// IDX magic number of an image file (unsigned bytes, 3 dimensions).
const IMAGES_MAGIC: u32 = 2051;
/// IDX magic number of a label file (unsigned bytes, 1 dimension).
const LABELS_MAGIC: u32 = 2049;
/// Upper bound on a decompressed file, so a corrupt or hostile gzip stream
/// cannot exhaust memory (full MNIST training images are 47 MB).
const MAX_DECOMPRESSED: u64 = 512 * 1024 * 1024;

/// Base names of the four files, in the order train images, train labels,
/// test images, test labels.
pub const FILE_NAMES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

const BUNDLED: [&[u8]; 4] = [
    include_bytes!("../data/mnist/train-images-idx3-ubyte.gz"),
    include_bytes!("../data/mnist/train-labels-idx1-ubyte.gz"),
    include_bytes!("../data/mnist/t10k-images-idx3-ubyte.gz"),
    include_bytes!("../data/mnist/t10k-labels-idx1-ubyte.gz"),
];

/// MNIST held in memory, ready to batch: images are normalised once at load
/// time so every training step only copies.
#[derive(Debug, Clone, PartialEq)]
pub struct MnistData {
    /// Training images, row-major, [`IMAGE_PIXELS`] values per image,
    /// normalised as `(x / 255 - PIXEL_MEAN) / PIXEL_STD`.
    pub train_images: Vec<f32>,
    /// Training labels, one digit 0..=9 per image.
    pub train_labels: Vec<u8>,
    /// Test images, laid out like `train_images`.
    pub test_images: Vec<f32>,
    /// Test labels, one per test image.
    pub test_labels: Vec<u8>,
}

impl MnistData {
    /// Number of training samples (what the swarm shards).
    pub fn num_train(&self) -> usize {
        self.train_labels.len()
    }

    /// Number of held-out test samples.
    pub fn num_test(&self) -> usize {
        self.test_labels.len()
    }

    /// A digest of the training set (images and labels, in order): peers
    /// shard sample indices, so they must hold the same samples in the same
    /// order. The test set is left out; it does not move the model.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("p2ptrain 2026 mnist training set");
        h.update(&(self.train_labels.len() as u64).to_le_bytes());
        h.update(&self.train_labels);
        let mut block = Vec::with_capacity(4 * IMAGE_PIXELS);
        for image in self.train_images.chunks(IMAGE_PIXELS) {
            block.clear();
            block.extend(image.iter().flat_map(|v| v.to_le_bytes()));
            h.update(&block);
        }
        *h.finalize().as_bytes()
    }

    /// Builds the data set from the raw bytes of the four files (each gzipped
    /// or plain), in [`FILE_NAMES`] order; `names` label them in errors.
    pub fn from_idx_bytes(names: [&str; 4], bytes: [&[u8]; 4]) -> Result<Self, TrainError> {
        let (train_images, train_labels) = load_pair(names[0], bytes[0], names[1], bytes[1])?;
        let (test_images, test_labels) = load_pair(names[2], bytes[2], names[3], bytes[3])?;
        Ok(Self {
            train_images,
            train_labels,
            test_images,
            test_labels,
        })
    }
}

/// Loads MNIST from a directory holding the four IDX files under their usual
/// names, each either plain or with a `.gz` suffix (the plain name wins when
/// both exist).
pub fn load_dir(dir: &Path) -> Result<MnistData, TrainError> {
    let bad = |path: &Path, problem: &str| TrainError::BadPath {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(
                dir,
                "does not exist; --data takes the directory holding the MNIST IDX files",
            ));
        }
        Ok(m) if !m.is_dir() => {
            return Err(bad(dir, "is not a directory; --data takes the directory holding the four MNIST IDX files, not one of them"));
        }
        _ => {}
    }
    let mut paths: Vec<PathBuf> = Vec::with_capacity(4);
    for name in FILE_NAMES {
        let plain = dir.join(name);
        let gz = dir.join(format!("{name}.gz"));
        let Some(path) = [plain, gz].into_iter().find(|p| p.exists()) else {
            return Err(TrainError::MissingFile {
                dir: dir.to_path_buf(),
                name: name.to_string(),
            });
        };
        // Not opened unless a regular file: a named pipe would block.
        match crate::files::check_regular(&path, "an MNIST IDX file") {
            Err(e) => return Err(bad(&path, &format!("is {e}"))),
            Ok(m) if m.len() > MAX_DECOMPRESSED => {
                return Err(bad(&path, &format!("holds {} bytes, more than any MNIST file ({MAX_DECOMPRESSED} at most); not an MNIST IDX file", m.len())));
            }
            _ => paths.push(path),
        }
    }
    let mut contents = Vec::with_capacity(4);
    for path in &paths {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_DECOMPRESSED + 1).read_to_end(&mut bytes))
            .map_err(|source| TrainError::Io {
                path: path.clone(),
                source,
            })?;
        contents.push(bytes);
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    MnistData::from_idx_bytes(
        [&names[0], &names[1], &names[2], &names[3]],
        [&contents[0], &contents[1], &contents[2], &contents[3]],
    )
}

/// Loads the subset compiled into the binary (the first 10,000 training and
/// 2,000 test samples; see `node/train/data/mnist/README.md`), so a node can train
/// with no files at all.
pub fn load_bundled() -> Result<MnistData, TrainError> {
    let labelled = FILE_NAMES.map(|n| format!("bundled {n}.gz"));
    MnistData::from_idx_bytes(
        [&labelled[0], &labelled[1], &labelled[2], &labelled[3]],
        BUNDLED,
    )
}

fn load_pair(
    images_name: &str,
    images_bytes: &[u8],
    labels_name: &str,
    labels_bytes: &[u8],
) -> Result<(Vec<f32>, Vec<u8>), TrainError> {
    let images = parse_images(images_name, &decompress(images_name, images_bytes)?)?;
    let labels = parse_labels(labels_name, &decompress(labels_name, labels_bytes)?)?;
    let image_count = images.len() / IMAGE_PIXELS;
    if image_count != labels.len() {
        return Err(TrainError::CountMismatch {
            images: images_name.to_string(),
            image_count,
            labels: labels_name.to_string(),
            label_count: labels.len(),
        });
    }
    if image_count == 0 {
        return Err(format_error(images_name, "it holds no samples"));
    }
    Ok((normalize(&images), labels))
}

/// Returns the file's bytes, gunzipped when they start with the gzip magic
/// `1f 8b` (every member of the stream, as `zcat` reads it), borrowed
/// otherwise so a large plain file is not copied.
pub fn decompress<'a>(name: &str, bytes: &'a [u8]) -> Result<Cow<'a, [u8]>, TrainError> {
    if !crate::files::is_gzip(bytes) {
        return Ok(Cow::Borrowed(bytes));
    }
    let out = crate::files::gunzip_capped(bytes, MAX_DECOMPRESSED).map_err(|e| {
        format_error(
            name,
            &format!("its gzip stream is truncated or corrupt ({e})"),
        )
    })?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(format_error(
            name,
            &format!("it decompresses to more than {MAX_DECOMPRESSED} bytes"),
        ));
    }
    Ok(Cow::Owned(out))
}

/// Parses a decompressed IDX image file into raw pixels (0..=255), checking
/// the magic number, the 28x28 dimensions and the exact length.
pub fn parse_images(name: &str, bytes: &[u8]) -> Result<Vec<u8>, TrainError> {
    let header = read_header(name, bytes, IMAGES_MAGIC, 4, "image")?;
    let (count, rows, cols) = (header[1], header[2], header[3]);
    if rows != IMAGE_SIDE || cols != IMAGE_SIDE {
        return Err(format_error(
            name,
            &format!("images are {rows}x{cols} pixels, expected {IMAGE_SIDE}x{IMAGE_SIDE}"),
        ));
    }
    let body = check_body(name, bytes, 16, count, IMAGE_PIXELS, "images")?;
    Ok(body.to_vec())
}

/// Parses a decompressed IDX label file, checking the magic number, the
/// exact length and that every label is a digit 0..=9.
pub fn parse_labels(name: &str, bytes: &[u8]) -> Result<Vec<u8>, TrainError> {
    let header = read_header(name, bytes, LABELS_MAGIC, 2, "label")?;
    let body = check_body(name, bytes, 8, header[1], 1, "labels")?;
    if let Some(index) = body.iter().position(|&l| usize::from(l) >= NUM_CLASSES) {
        return Err(format_error(
            name,
            &format!(
                "label {index} is {}, but labels must be digits 0 to 9",
                body[index]
            ),
        ));
    }
    Ok(body.to_vec())
}

/// Reads `words` big-endian u32 header words; word 0 must be `magic`.
fn read_header(
    name: &str,
    bytes: &[u8],
    magic: u32,
    words: usize,
    kind: &str,
) -> Result<Vec<usize>, TrainError> {
    if bytes.len() < 4 * words {
        return Err(format_error(
            name,
            &format!(
                "it is {} bytes long, shorter than the {}-byte header of an IDX {kind} file",
                bytes.len(),
                4 * words
            ),
        ));
    }
    let header: Vec<u32> = bytes[..4 * words]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if header[0] != magic {
        let other = match header[0] {
            IMAGES_MAGIC => " (that is an image file)",
            LABELS_MAGIC => " (that is a label file)",
            _ => "",
        };
        return Err(format_error(
            name,
            &format!(
                "magic number is {}{other}, expected {magic} for an IDX {kind} file",
                header[0]
            ),
        ));
    }
    Ok(header.iter().map(|&w| w as usize).collect())
}

/// Checks that exactly `count` items of `item_len` bytes follow the header.
fn check_body<'a>(
    name: &str,
    bytes: &'a [u8],
    header_len: usize,
    count: usize,
    item_len: usize,
    what: &str,
) -> Result<&'a [u8], TrainError> {
    let body = &bytes[header_len..];
    let expected = count.checked_mul(item_len).ok_or_else(|| {
        format_error(name, &format!("its header claims an absurd {count} {what}"))
    })?;
    if body.len() < expected {
        return Err(format_error(
            name,
            &format!(
                "it is truncated: the header announces {count} {what} ({expected} bytes) \
                 but only {} bytes follow",
                body.len()
            ),
        ));
    }
    if body.len() > expected {
        return Err(format_error(
            name,
            &format!(
                "{} unexpected bytes follow the {count} {what} the header announces",
                body.len() - expected
            ),
        ));
    }
    Ok(body)
}

fn normalize(pixels: &[u8]) -> Vec<f32> {
    pixels
        .iter()
        .map(|&p| (f32::from(p) / 255.0 - PIXEL_MEAN) / PIXEL_STD)
        .collect()
}

fn format_error(file: &str, problem: &str) -> TrainError {
    TrainError::Format {
        file: file.to_string(),
        problem: problem.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A valid IDX image file with `n` images whose pixels are `i % 256`.
    pub(crate) fn idx_images(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [IMAGES_MAGIC, n as u32, 28, 28] {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out.extend((0..n * IMAGE_PIXELS).map(|i| (i % 256) as u8));
        out
    }

    /// A valid IDX label file holding `labels`.
    pub(crate) fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [LABELS_MAGIC, labels.len() as u32] {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out.extend_from_slice(labels);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).expect("in-memory write");
        enc.finish().expect("in-memory gzip")
    }

    fn problem(err: TrainError) -> String {
        err.to_string()
    }

    #[test]
    fn parses_plain_and_gzip_alike() {
        let images = idx_images(3);
        let plain = parse_images("a", &decompress("a", &images).unwrap()).unwrap();
        let gz = parse_images("a", &decompress("a", &gzip(&images)).unwrap()).unwrap();
        assert_eq!(plain.len(), 3 * IMAGE_PIXELS);
        assert_eq!(plain, gz);
        let labels = parse_labels(
            "l",
            &decompress("l", &gzip(&idx_labels(&[0, 9, 5]))).unwrap(),
        )
        .unwrap();
        assert_eq!(labels, vec![0, 9, 5]);
    }

    #[test]
    fn rejects_wrong_magic() {
        let mut labels = idx_labels(&[1; 20]);
        labels[..4].copy_from_slice(&LABELS_MAGIC.to_be_bytes());
        let err = parse_images("lbl.idx", &labels).unwrap_err();
        let msg = problem(err);
        assert!(
            msg.contains("lbl.idx") && msg.contains("magic number is 2049"),
            "{msg}"
        );
        let err = parse_labels("img.idx", &idx_images(1)).unwrap_err();
        assert!(problem(err).contains("expected 2049"));
    }

    #[test]
    fn rejects_truncated_and_trailing_bytes() {
        let mut images = idx_images(2);
        images.truncate(images.len() - 1);
        let msg = problem(parse_images("t.idx", &images).unwrap_err());
        assert!(msg.contains("t.idx") && msg.contains("truncated"), "{msg}");

        let msg = problem(parse_images("h.idx", &images[..10]).unwrap_err());
        assert!(msg.contains("shorter than the 16-byte header"), "{msg}");

        let mut labels = idx_labels(&[1, 2]);
        labels.push(3);
        let msg = problem(parse_labels("x.idx", &labels).unwrap_err());
        assert!(msg.contains("1 unexpected bytes"), "{msg}");

        let gz = gzip(&idx_images(2));
        let msg = problem(decompress("cut.gz", &gz[..gz.len() / 2]).unwrap_err());
        assert!(msg.contains("cut.gz") && msg.contains("gzip"), "{msg}");
    }

    #[test]
    fn rejects_wrong_dimensions() {
        let mut images = idx_images(1);
        images[8..12].copy_from_slice(&27u32.to_be_bytes());
        let msg = problem(parse_images("d.idx", &images).unwrap_err());
        assert!(msg.contains("27x28"), "{msg}");
    }

    #[test]
    fn rejects_bad_label() {
        let msg = problem(parse_labels("b.idx", &idx_labels(&[1, 10, 2])).unwrap_err());
        assert!(
            msg.contains("b.idx") && msg.contains("label 1 is 10"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_count_mismatch() {
        let images = idx_images(3);
        let labels = idx_labels(&[1, 2]);
        let err = MnistData::from_idx_bytes(
            ["ti", "tl", "vi", "vl"],
            [&images, &labels, &images, &idx_labels(&[1, 2, 3])],
        )
        .unwrap_err();
        assert!(matches!(
            err,
            TrainError::CountMismatch {
                image_count: 3,
                label_count: 2,
                ..
            }
        ));
        assert!(err
            .to_string()
            .contains("ti holds 3 images but tl holds 2 labels"));
    }

    #[test]
    fn every_member_of_a_multi_member_gzip_is_read() {
        let images = idx_images(3);
        let (head, tail) = images.split_at(100);
        let mut two = gzip(head);
        two.extend(gzip(tail));
        let got = parse_images("two.gz", &decompress("two.gz", &two).unwrap()).unwrap();
        assert_eq!(got.len(), 3 * IMAGE_PIXELS);
        // Bytes after the stream that are no gzip member are refused.
        let mut trailing = gzip(&images);
        trailing.extend_from_slice(b"garbage!");
        assert!(decompress("t.gz", &trailing).is_err());
    }

    #[test]
    fn data_paths_that_are_not_a_directory_of_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere");
        let msg = load_dir(&missing).unwrap_err().to_string();
        assert!(msg.contains("nowhere does not exist"), "{msg}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let msg = load_dir(&file).unwrap_err().to_string();
        assert!(msg.contains("is not a directory"), "{msg}");
        // A directory under a file's name (or a pipe, which would block).
        std::fs::create_dir(dir.path().join(FILE_NAMES[0])).unwrap();
        let msg = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("is a directory, not an MNIST IDX file"),
            "{msg}"
        );
    }

    #[test]
    fn load_dir_reads_either_name_form_and_names_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            (FILE_NAMES[0], idx_images(4), true),
            (FILE_NAMES[1], idx_labels(&[0, 1, 2, 3]), false),
            (FILE_NAMES[2], idx_images(2), false),
        ];
        for (name, bytes, gz) in &files {
            // Gzip detection goes by content: write a gzipped file under a `.gz` name
            // and a plain one under the plain name.
            let (path, bytes) = if *gz {
                (dir.path().join(format!("{name}.gz")), gzip(bytes))
            } else {
                (dir.path().join(name), bytes.clone())
            };
            std::fs::write(path, bytes).unwrap();
        }
        let msg = load_dir(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("t10k-labels-idx1-ubyte"), "{msg}");

        // A gzipped file under the plain name is still recognised.
        std::fs::write(dir.path().join(FILE_NAMES[3]), gzip(&idx_labels(&[7, 8]))).unwrap();
        let data = load_dir(dir.path()).unwrap();
        assert_eq!(data.num_train(), 4);
        assert_eq!(data.num_test(), 2);
        assert_eq!(data.test_labels, vec![7, 8]);
        let zero = (0.0 - PIXEL_MEAN) / PIXEL_STD;
        assert!((data.train_images[0] - zero).abs() < 1e-6);
    }

    #[test]
    fn bundled_subset_loads() {
        let data = load_bundled().unwrap();
        assert_eq!(data.num_train(), 10_000);
        assert_eq!(data.num_test(), 2_000);
        assert_eq!(data.train_images.len(), 10_000 * IMAGE_PIXELS);
        assert_eq!(data.test_images.len(), 2_000 * IMAGE_PIXELS);
        // The first MNIST training digit is a 5, the first test digit a 7.
        assert_eq!(data.train_labels[0], 5);
        assert_eq!(data.test_labels[0], 7);
        let max = data.train_images.iter().cloned().fold(f32::MIN, f32::max);
        assert!((max - (1.0 - PIXEL_MEAN) / PIXEL_STD).abs() < 1e-5);
    }

    #[test]
    fn the_fingerprint_follows_every_training_sample_and_nothing_else() {
        let data = load_bundled().unwrap();
        let print = data.fingerprint();
        assert_eq!(load_bundled().unwrap().fingerprint(), print);
        let mut label = load_bundled().unwrap();
        label.train_labels[9_999] ^= 1;
        let mut pixel = load_bundled().unwrap();
        pixel.train_images[IMAGE_PIXELS * 5_000 + 300] += 0.5;
        let mut fewer = load_bundled().unwrap();
        fewer.train_labels.pop();
        fewer.train_images.truncate(9_999 * IMAGE_PIXELS);
        for other in [label, pixel, fewer] {
            assert_ne!(other.fingerprint(), print);
        }
        // The test set does not move the model: it does not count.
        let mut test = load_bundled().unwrap();
        test.test_labels[0] ^= 1;
        assert_eq!(test.fingerprint(), print);
    }
}
