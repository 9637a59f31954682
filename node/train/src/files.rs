//! Reading the data files a user names: their kind checked before opening
//! (a named pipe would block the reader for good), gzip told by content and
//! read whole.

use std::io::Read;
use std::path::Path;

/// Refuses a path that is not a regular file (following links): a
/// directory, a device or a named pipe, each named as such. `what` names
/// what the file should be, for the error. Returns the file's metadata, so
/// a caller checking its size looks it up once.
pub fn check_regular(path: &Path, what: &str) -> std::io::Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path)?;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(meta);
    }
    let is = if kind.is_dir() {
        "a directory"
    } else {
        special_kind(&kind)
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{is}, not {what}"),
    ))
}

#[cfg(unix)]
fn special_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_fifo() {
        "a named pipe"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "not a regular file"
}

/// Whether `bytes` start as gzip does (`1f 8b`); no text file starts so,
/// since `8b` cannot follow `1f` in UTF-8.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Decompresses every member of a gzip stream (as `zcat` does: `cat a.gz
/// b.gz` is one valid stream), reading at most `limit + 1` bytes of output so
/// the caller can refuse a larger one without holding it.
pub fn gunzip_capped(bytes: &[u8], limit: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(limit + 1)
        .read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn every_member_is_read_and_the_output_capped() {
        let mut two = gzip(b"first ");
        two.extend(gzip(b"second"));
        assert!(is_gzip(&two) && !is_gzip(b"plain"));
        assert_eq!(gunzip_capped(&two, 100).unwrap(), b"first second");
        assert_eq!(gunzip_capped(&two, 3).unwrap().len(), 4, "limit + 1");
        let mut trailing = gzip(b"x");
        trailing.extend_from_slice(b"garbage!");
        assert!(gunzip_capped(&trailing, 100).is_err());
    }

    #[test]
    fn directories_devices_and_pipes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_regular(dir.path(), "a key").unwrap_err();
        assert_eq!(err.to_string(), "a directory, not a key");
        #[cfg(unix)]
        {
            let err = check_regular(Path::new("/dev/zero"), "a key").unwrap_err();
            assert_eq!(err.to_string(), "a device, not a key");
            let fifo = dir.path().join("pipe");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            assert!(made.is_ok_and(|s| s.success()));
            let err = check_regular(&fifo, "a key").unwrap_err();
            assert_eq!(err.to_string(), "a named pipe, not a key");
        }
    }
}
