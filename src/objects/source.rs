//! A file opened once for archiving. Every pass over it (the sample that
//! chooses the encoding, the S3 backend's hashing pass, the encoder) reads
//! the same open file by position, so what is archived is the file that was
//! opened and checked, whatever the path names meanwhile.
//!
//! Opening never blocks on a FIFO or a device (`O_NONBLOCK`) and anything
//! but a regular file is refused.

use super::fs::source_error;
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open regular file and the path it was opened by (for messages).
#[derive(Debug, Clone)]
pub struct Source {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
}

/// Flags every source is opened with: a FIFO or device opens without
/// waiting for a peer (and is then refused as not a regular file).
fn open_options(follow: bool) -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    o.read(true).custom_flags(flags);
    o
}

impl Source {
    /// Opens `path` (symlinks followed). A missing, unreadable or
    /// non-regular file is [`Error::Refused`].
    pub fn open(path: &Path) -> Result<Source> {
        let file = open_options(true)
            .open(path)
            .map_err(|e| source_error(path, e))?;
        Source::from_file(file, path)
    }

    /// Opens `path` without following a symlink in its last component: a
    /// symlink there fails with `ELOOP` (`io::Error::raw_os_error() ==
    /// Some(libc::ELOOP)`). The raw I/O error is returned so callers can say
    /// what they found.
    pub fn open_nofollow(path: &Path) -> io::Result<File> {
        open_options(false).open(path)
    }

    /// Wraps an open file; refuses anything but a regular file.
    pub fn from_file(file: File, path: &Path) -> Result<Source> {
        let meta = file.metadata().map_err(|e| source_error(path, e))?;
        if !meta.file_type().is_file() {
            return Err(Error::Refused(format!(
                "{}: not a regular file ({})",
                path.display(),
                describe_type(&meta.file_type())
            )));
        }
        Ok(Source {
            file: Arc::new(file),
            path: path.to_path_buf(),
            len: meta.len(),
        })
    }

    /// A source over any open file, unchecked (tests of read errors).
    #[cfg(test)]
    pub(crate) fn unchecked(file: File, path: &Path) -> Source {
        Source {
            file: Arc::new(file),
            path: path.to_path_buf(),
            len: 0,
        }
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its size when it was opened.
    pub fn len_at_open(&self) -> u64 {
        self.len
    }

    /// A reader from the start of the file with its own position (reads
    /// by `pread`, so several readers never disturb each other).
    pub fn reader(&self) -> SourceReader {
        SourceReader {
            file: self.file.clone(),
            pos: 0,
        }
    }
}

/// Reads a [`Source`] from its start, by position.
#[derive(Debug)]
pub struct SourceReader {
    file: Arc<File>,
    pos: u64,
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// What kind of file a non-regular file is, for a reason an operator reads.
pub fn describe_type(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}
