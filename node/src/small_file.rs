//! Reading the files a user names whole (key, swarm secret, config,
//! checkpoint).
//!
//! Their size and kind are the user's: a path that is really `/dev/zero`, a
//! pipe, a disk image or a log must fail with its name, not fill memory or
//! block forever before anything looks at the content.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `out` through a temporary file beside it (named with
/// this process's id, so it is nobody else's) that is flushed to the disk
/// and renamed over `out`: a crash leaves the old file or the new one, never
/// half of one, and a failed write leaves no temporary file behind.
pub fn write_atomically(out: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the output path names no file",
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The largest key, secret or config file read: far above any real one.
pub const SMALL_FILE_LIMIT: u64 = 1 << 20;

/// Reads `path` whole, refusing anything but a regular file (checked before
/// opening, so a named pipe cannot block us) and a file of more than `limit`
/// bytes. `what` names what the file should be, for the error.
pub fn read_capped(path: &Path, limit: u64, what: &str) -> std::io::Result<Vec<u8>> {
    check_regular(path, what)?;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes; not {what}"),
        ));
    }
    Ok(bytes)
}

pub use crate::train::files::check_regular;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_past_the_limit_are_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 10]).unwrap();
        assert_eq!(read_capped(&path, 10, "a key").unwrap(), [7u8; 10]);
        let err = read_capped(&path, 9, "a key").unwrap_err();
        assert_eq!(err.to_string(), "larger than 9 bytes; not a key");
    }

    #[test]
    fn non_files_are_refused_unopened() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_capped(dir.path(), 10, "a key").unwrap_err();
        assert_eq!(err.to_string(), "a directory, not a key");
    }
}
