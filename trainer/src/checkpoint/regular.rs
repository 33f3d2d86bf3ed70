//! Reading a checkpoint's files without trusting its directory: a file is opened only if it
//! is itself a regular file (a symbolic link is not followed, a FIFO does not block the
//! open, a device is refused by its type) and never more bytes are read than expected.

use std::fs::{File, FileType};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::error::{CheckpointError, Result, io_err};

/// Opens `path` read-only if it is a regular file; returns it with its length, or `None`
/// when nothing is there. Anything else (a symbolic link, even to a regular file; a FIFO;
/// a device; a directory) is [`CheckpointError::NotRegularFile`].
pub(crate) fn open_regular(path: &Path) -> Result<Option<(File, u64)>> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            // O_NOFOLLOW fails with ELOOP on a link; say where it points.
            if let Ok(target) = std::fs::read_link(path) {
                return Err(CheckpointError::NotRegularFile {
                    path: path.into(),
                    found: format!("a symbolic link to {}", target.display()),
                });
            }
            return Err(io_err("open", path)(e));
        }
    };
    // fstat of the opened handle: the type of what was opened, not of what the name
    // points to now.
    let meta = file.metadata().map_err(io_err("stat", path))?;
    if !meta.file_type().is_file() {
        return Err(CheckpointError::NotRegularFile {
            path: path.into(),
            found: describe(meta.file_type()).into(),
        });
    }
    Ok(Some((file, meta.len())))
}

/// Reads at most `len` bytes of `file` (its length when opened): a file that grows while
/// it is read is not followed further.
pub(crate) fn read_at_most(file: File, len: u64, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(len)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    Ok(bytes)
}

fn describe(t: FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}
