//! Reading the small files a user names (key, swarm secret, config).
//!
//! Their size is the user's: a path that is really `/dev/zero`, a disk image
//! or a log must fail with its name, not fill memory before anything looks at
//! the content.

use std::io::Read;
use std::path::Path;

/// The largest key, secret or config file read: far above any real one.
pub const SMALL_FILE_LIMIT: u64 = 1 << 20;

/// Reads `path` whole, refusing it if it holds more than `limit` bytes.
pub fn read_capped(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes; not a key, secret or config file"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_past_the_limit_are_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 10]).unwrap();
        assert_eq!(read_capped(&path, 10).unwrap(), [7u8; 10]);
        let err = read_capped(&path, 9).unwrap_err();
        assert!(err.to_string().contains("larger than 9 bytes"), "{err}");
        #[cfg(unix)]
        {
            let err = read_capped(Path::new("/dev/zero"), SMALL_FILE_LIMIT).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        }
    }
}
