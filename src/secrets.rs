//! Reading a secret (a bearer token, a password) from a file: the MLflow exporter's
//! `token_file` / `password_file` and the receiver's `bearer_token_file`. One reader, so both
//! refuse the same files: not a regular file (a FIFO would block, a device never end), larger
//! than [`MAX_SECRET_FILE_BYTES`], or nothing but white space. Errors name the file, never
//! its content.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest secret file read, in bytes (tokens and passwords are far smaller).
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Why a secret file gave no secret. Messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", file.display())]
    Unreadable {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds nothing but white space.
    #[error("{} is empty", file.display())]
    Empty {
        /// The file.
        file: PathBuf,
    },
    /// Not a regular file (after symlinks): a FIFO would block the reader, a
    /// device could be read forever.
    #[error("{} is not a regular file", file.display())]
    NotAFile {
        /// The file.
        file: PathBuf,
    },
    /// Larger than [`MAX_SECRET_FILE_BYTES`]: not a credential.
    #[error("{} is larger than {MAX_SECRET_FILE_BYTES} bytes", file.display())]
    TooLarge {
        /// The file.
        file: PathBuf,
    },
}


/// The secret in `file`, trimmed of surrounding white space. Symlinks are followed (mounted
/// secrets are symlinks).
///
/// Errors: see [`SecretFileError`].
pub fn read_secret_file(file: &Path) -> Result<String, SecretFileError> {
    let unreadable = |source| SecretFileError::Unreadable { file: file.to_path_buf(), source };
    // Checked before the open too: opening a FIFO blocks until it has a writer.
    let regular = |m: std::fs::Metadata| m.is_file().then_some(m.len()).ok_or(SecretFileError::NotAFile { file: file.to_path_buf() });
    regular(std::fs::metadata(file).map_err(unreadable)?)?;
    let mut f = std::fs::File::open(file).map_err(unreadable)?;
    if regular(f.metadata().map_err(unreadable)?)? > MAX_SECRET_FILE_BYTES {
        return Err(SecretFileError::TooLarge { file: file.to_path_buf() });
    }
    let mut text = String::new();
    f.by_ref().take(MAX_SECRET_FILE_BYTES).read_to_string(&mut text).map_err(unreadable)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretFileError::Empty { file: file.to_path_buf() });
    }
    Ok(secret.to_string())
}
