//! File-system helpers of both directions and both backends: reading a
//! file whole, the error class of a failed read or write (what an operator
//! must fix is refused; what may pass is retried), and the pieces of an
//! atomic write — a unique temporary name beside the target, and the
//! directory sync that makes the final rename durable.

use crate::error::{Error, Result};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Fills `buf` from `file`; short only at the end of the file.
pub(super) fn read_full(file: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A missing or unreadable source file will not get better by retrying.
pub(super) fn source_error(path: &Path, e: io::Error) -> Error {
    let what = format!("cannot read {}: {e}", path.display());
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied | io::ErrorKind::IsADirectory => {
            Error::Refused(what)
        }
        _ => Error::Storage(what),
    }
}

/// A local filesystem failure while writing: a missing directory or a
/// denied permission stays that way until someone acts; anything else (a
/// full disk, an I/O error) may pass.
pub(super) fn local_error(path: &Path, e: io::Error) -> Error {
    let what = format!("{}: {e}", path.display());
    match e.kind() {
        io::ErrorKind::NotFound
        | io::ErrorKind::PermissionDenied
        | io::ErrorKind::ReadOnlyFilesystem => Error::Refused(what),
        _ => Error::Storage(what),
    }
}

/// A unique temporary name in the same directory as `path` (so that the
/// final rename is atomic).
pub(super) fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Refused(format!("{} names no file", path.display())))?;
    let tmp = format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    );
    Ok(path.with_file_name(tmp))
}

/// Makes a rename in `path`'s directory durable.
pub(super) async fn sync_parent(path: &Path) -> Result<()> {
    let Some(dir) = path.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    }) else {
        return Ok(());
    };
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(|e| Error::Storage(format!("syncing a directory: {e}")))?
        .map_err(|e| local_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_sit_beside_their_target() {
        let tmp = temp_path(Path::new("/a/b/report.csv")).unwrap();
        assert_eq!(tmp.parent(), Some(Path::new("/a/b")));
        assert!(
            tmp.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".report.csv.")
        );
    }
}
