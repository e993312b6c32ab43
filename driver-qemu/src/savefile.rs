//! The save file: a small domkit header followed by QEMU's raw migration stream.
//!
//! Layout: the line `DOMKIT-SAVE`, one line of JSON ([`SaveHeader`]), then the migration
//! stream exactly as QEMU wrote it. QEMU gets the file descriptor positioned after the header
//! (it shares the open file description, so it reads/writes from that offset), for both save
//! (`migrate fd:NAME`) and restore (`migrate-incoming fd:NAME`).
//!
//! A save is written to a temporary file in the same directory as the target ([`TempSaveFile`])
//! and renamed over the target only once QEMU reported success and the data is on disk, so a
//! failed save never damages an older file and never leaves a partial one. The temporary file
//! is created first: an unwritable directory fails before the domain is touched.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use domkit_core::DomainId;
use serde::{Deserialize, Serialize};

/// The first line of every domkit save file.
pub const MAGIC: &str = "DOMKIT-SAVE";
/// The header format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The longest header accepted when reading (a header is a few hundred bytes).
pub const MAX_HEADER_LEN: usize = 64 * 1024;

/// What domkit records about a save, ahead of the migration stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveHeader {
    /// [`FORMAT_VERSION`] when written.
    pub format: u32,
    /// The backend that wrote the stream (`qemu`): a Xen save cannot be restored by QEMU.
    pub backend: String,
    /// The saved domain.
    pub domain: DomainId,
    /// Whether the vCPUs were paused when the save began (restore keeps them paused).
    pub was_paused: bool,
    /// The QEMU version that wrote the stream (`7.2.22`): a newer QEMU reads older streams,
    /// not the reverse.
    pub qemu_version: String,
    /// The domain's memory, MiB (the restoring config must match).
    pub memory_mib: u64,
}

/// Why a file is not a usable domkit save file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaveFileError {
    /// The file does not start with the magic line.
    #[error("not a domkit save file (no {MAGIC} header): was it written by domkit's save?")]
    NotASaveFile,
    /// The header is cut short or longer than [`MAX_HEADER_LEN`].
    #[error("the save file header is truncated or too long: the file is damaged")]
    Truncated,
    /// The header's JSON does not parse.
    #[error("the save file header is malformed: {0}")]
    Malformed(String),
    /// Written by a newer domkit.
    #[error("save file format {0} is newer than this domkit understands ({FORMAT_VERSION}): upgrade domkit")]
    UnsupportedFormat(u32),
}

/// The header bytes: magic line and JSON line.
pub fn encode_header(header: &SaveHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC.as_bytes());
    out.push(b'\n');
    // Serialising a struct of strings and numbers cannot fail.
    out.extend_from_slice(&serde_json::to_vec(header).unwrap_or_default());
    out.push(b'\n');
    out
}

/// Parse the header at the start of `bytes`; returns it and its length in bytes (where the
/// migration stream starts). `bytes` may extend past the header.
pub fn parse_header(bytes: &[u8]) -> Result<(SaveHeader, usize), SaveFileError> {
    let magic_end = MAGIC.len();
    if bytes.len() <= magic_end {
        return if MAGIC.as_bytes().starts_with(bytes) && !bytes.is_empty() {
            Err(SaveFileError::Truncated)
        } else {
            Err(SaveFileError::NotASaveFile)
        };
    }
    if &bytes[..magic_end] != MAGIC.as_bytes() || bytes[magic_end] != b'\n' {
        return Err(SaveFileError::NotASaveFile);
    }
    let rest = &bytes[magic_end + 1..];
    let limit = rest.len().min(MAX_HEADER_LEN);
    let json_len = rest[..limit]
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(SaveFileError::Truncated)?;
    let value: serde_json::Value = serde_json::from_slice(&rest[..json_len])
        .map_err(|e| SaveFileError::Malformed(e.to_string()))?;
    // Check the version before the shape: a newer format may have another shape.
    let format = value.get("format").and_then(serde_json::Value::as_u64);
    match format {
        Some(f) if f > u64::from(FORMAT_VERSION) => {
            return Err(SaveFileError::UnsupportedFormat(
                u32::try_from(f).unwrap_or(u32::MAX),
            ))
        }
        _ => {}
    }
    let header: SaveHeader =
        serde_json::from_value(value).map_err(|e| SaveFileError::Malformed(e.to_string()))?;
    Ok((header, magic_end + 1 + json_len + 1))
}

/// A save in progress: a temporary file next to the target, removed on drop unless
/// [`TempSaveFile::commit`] renamed it over the target.
#[derive(Debug)]
pub struct TempSaveFile {
    file: File,
    temp_path: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl TempSaveFile {
    /// Create the temporary file (mode 0600, never an existing file) in `target`'s directory
    /// and write `header` to it; the file offset ends after the header.
    pub fn create(target: &Path, header: &SaveHeader) -> io::Result<Self> {
        let file_name = target.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the save path has no file name",
            )
        })?;
        if target.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the save path is a directory",
            ));
        }
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut name = std::ffi::OsString::from(".");
        name.push(file_name);
        name.push(format!(
            ".domkit-tmp-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let temp_path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp_path)?;
        let mut temp = TempSaveFile {
            file,
            temp_path,
            target: target.to_path_buf(),
            committed: false,
        };
        temp.file.write_all(&encode_header(header))?;
        Ok(temp)
    }

    /// The open file, positioned after the header (pass it to QEMU).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    /// Make the save durable and visible: fsync the file, rename it over the target, fsync
    /// the directory. On error the temporary file is removed (by drop) and the target is
    /// untouched.
    pub fn commit(mut self) -> io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.temp_path, &self.target)?;
        self.committed = true;
        if let Some(dir) = self.target.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            // Best effort: the rename is done; a directory fsync error only weakens
            // durability across a power loss, which is not worth failing the save for.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for TempSaveFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp_path);
        }
    }
}

/// Open a save file for restore: read and check its header, and leave the file offset at the
/// start of the migration stream.
pub fn open_for_restore(path: &Path) -> io::Result<(File, SaveHeader)> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; MAX_HEADER_LEN + MAGIC.len() + 2];
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read_at(&mut buf[filled..], filled as u64)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    let (header, len) =
        parse_header(&buf[..filled]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    file.seek(SeekFrom::Start(len as u64))?;
    Ok((file, header))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SaveHeader {
        SaveHeader {
            format: FORMAT_VERSION,
            backend: "qemu".into(),
            domain: DomainId {
                name: "web1".into(),
                uuid: uuid::Uuid::nil(),
            },
            was_paused: true,
            qemu_version: "7.2.22".into(),
            memory_mib: 128,
        }
    }

    #[test]
    fn header_round_trips_and_reports_stream_offset() {
        let mut bytes = encode_header(&header());
        let len = bytes.len();
        bytes.extend_from_slice(b"QEVM\x00\x00\x00\x03rest of stream\n{not json");
        let (parsed, offset) = parse_header(&bytes).expect("parse");
        assert_eq!(parsed, header());
        assert_eq!(offset, len);
        assert_eq!(&bytes[offset..offset + 4], b"QEVM");
    }

    #[test]
    fn bad_headers_are_typed_errors() {
        assert_eq!(parse_header(b"QEVM..."), Err(SaveFileError::NotASaveFile));
        assert_eq!(parse_header(b""), Err(SaveFileError::NotASaveFile));
        assert_eq!(parse_header(b"DOMKIT"), Err(SaveFileError::Truncated));
        assert_eq!(
            parse_header(b"DOMKIT-SAVE\n{\"format\":1"),
            Err(SaveFileError::Truncated)
        );
        assert!(matches!(
            parse_header(b"DOMKIT-SAVE\n{nope}\n"),
            Err(SaveFileError::Malformed(_))
        ));
        assert_eq!(
            parse_header(b"DOMKIT-SAVE\n{\"format\":9,\"other\":1}\n"),
            Err(SaveFileError::UnsupportedFormat(9))
        );
    }

    #[test]
    fn temp_file_is_removed_unless_committed_and_old_file_survives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("web1.save");
        std::fs::write(&target, b"older good save").expect("old");

        let temp = TempSaveFile::create(&target, &header()).expect("create");
        let temp_path = temp.temp_path().to_path_buf();
        assert!(temp_path.exists());
        drop(temp); // a failed save
        assert!(!temp_path.exists());
        assert_eq!(std::fs::read(&target).expect("read"), b"older good save");

        let mut temp = TempSaveFile::create(&target, &header()).expect("create");
        temp.file.write_all(b"STREAM").expect("write");
        temp.commit().expect("commit");
        let (mut file, parsed) = open_for_restore(&target).expect("open");
        assert_eq!(parsed, header());
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut rest).expect("read");
        assert_eq!(rest, b"STREAM");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn directory_target_fails_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = TempSaveFile::create(dir.path(), &header()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }
}
