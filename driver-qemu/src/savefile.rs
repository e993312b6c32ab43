//! The save file: a small domkit header followed by QEMU's raw migration stream.
//!
//! Layout: the line `DOMKIT-SAVE`, one line of JSON ([`SaveHeader`]), one fixed-width digest
//! line (`DIGEST crc32=<8 hex> len=<20 digits>`: the CRC-32 and length of the stream), then
//! the migration stream exactly as QEMU wrote it. The digest line is written as zeros first
//! and sealed in place once QEMU finished ([`TempSaveFile::commit`]); a restore checks it
//! over the whole stream before QEMU reads a byte ([`verify_stream`]), so a damaged file
//! (one flipped bit included) is refused instead of restoring a silently corrupted guest. QEMU gets the file descriptor positioned after the header
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
/// The header format this crate writes and reads (2: with the stream digest).
pub const FORMAT_VERSION: u32 = 2;
/// The digest line's length: `DIGEST crc32=` + 8 hex + ` len=` + 20 digits + newline.
pub const DIGEST_LINE_LEN: usize = 13 + 8 + 5 + 20 + 1;
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
    /// The saved instance's devices with their addresses, hotplugged ones included (§14):
    /// the restore rebuilds exactly these. Absent: the definition's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<crate::devices::DeviceSet>,
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
    /// Written by an older domkit, without a stream digest: it cannot be verified.
    #[error("save file format {0} has no stream digest, so it cannot be verified: save the domain again with this domkit")]
    NoDigest(u32),
    /// The stream does not match its digest (damaged, truncated, or never sealed).
    #[error("the saved state is damaged: {0}")]
    Damaged(String),
}

/// The stream's CRC-32 and length, as the digest line records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamDigest {
    /// CRC-32 (IEEE) of the stream.
    pub crc32: u32,
    /// Its length in bytes.
    pub len: u64,
}

fn digest_line(d: StreamDigest) -> Vec<u8> {
    format!("DIGEST crc32={:08x} len={:020}\n", d.crc32, d.len).into_bytes()
}

fn parse_digest_line(line: &[u8]) -> Option<StreamDigest> {
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix("DIGEST crc32=")?.strip_suffix('\n')?;
    let (crc, len) = rest.split_once(" len=")?;
    if crc.len() != 8 || len.len() != 20 {
        return None;
    }
    Some(StreamDigest {
        crc32: u32::from_str_radix(crc, 16).ok()?,
        len: len.parse().ok()?,
    })
}

/// The header bytes: magic line, JSON line, and the digest line (zeros until sealed).
pub fn encode_header(header: &SaveHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC.as_bytes());
    out.push(b'\n');
    // Serialising a struct of strings and numbers cannot fail.
    out.extend_from_slice(&serde_json::to_vec(header).unwrap_or_default());
    out.push(b'\n');
    out.extend_from_slice(&digest_line(StreamDigest { crc32: 0, len: 0 }));
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
        Some(f) if f < u64::from(FORMAT_VERSION) => {
            return Err(SaveFileError::NoDigest(u32::try_from(f).unwrap_or(0)))
        }
        _ => {}
    }
    let header: SaveHeader =
        serde_json::from_value(value).map_err(|e| SaveFileError::Malformed(e.to_string()))?;
    let digest_at = magic_end + 1 + json_len + 1;
    let digest_end = digest_at + DIGEST_LINE_LEN;
    let Some(line) = bytes.get(digest_at..digest_end) else {
        return Err(SaveFileError::Truncated);
    };
    if parse_digest_line(line).is_none() {
        return Err(SaveFileError::Malformed(
            "the digest line is malformed".into(),
        ));
    }
    Ok((header, digest_end))
}

/// The digest recorded in a header that [`parse_header`] accepted with stream offset
/// `stream_start`.
pub fn recorded_digest(bytes: &[u8], stream_start: usize) -> Option<StreamDigest> {
    let line = bytes.get(stream_start.checked_sub(DIGEST_LINE_LEN)?..stream_start)?;
    parse_digest_line(line)
}

/// CRC-32 and length of everything in `file` from `start` on.
fn digest_from(file: &File, start: u64) -> io::Result<StreamDigest> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(StreamDigest {
        crc32: hasher.finalize(),
        len: at - start,
    })
}

/// Check the stream of an opened save file against its recorded digest (before QEMU reads
/// it): `Damaged` on any difference, an unsealed digest included.
pub fn verify_stream(
    file: &File,
    stream_start: u64,
    recorded: StreamDigest,
) -> Result<(), SaveFileError> {
    let actual = digest_from(file, stream_start)
        .map_err(|e| SaveFileError::Damaged(format!("reading it failed: {e}")))?;
    if actual.len != recorded.len {
        return Err(SaveFileError::Damaged(format!(
            "the stream has {} bytes but {} were saved (truncated or extended)",
            actual.len, recorded.len
        )));
    }
    if actual.crc32 != recorded.crc32 {
        return Err(SaveFileError::Damaged(format!(
            "the stream's CRC-32 is {:08x}, not the {:08x} saved",
            actual.crc32, recorded.crc32
        )));
    }
    Ok(())
}

/// A fresh temporary name next to `target` (`.<name>.domkit-tmp-<pid>-<uuid>`), refusing a
/// target that is a directory or has no file name.
pub fn temp_path_for(target: &Path) -> io::Result<PathBuf> {
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
    Ok(dir.join(name))
}

/// A save in progress: a temporary file next to the target, removed on drop unless
/// [`TempSaveFile::commit`] renamed it over the target.
#[derive(Debug)]
pub struct TempSaveFile {
    file: File,
    temp_path: PathBuf,
    target: PathBuf,
    committed: bool,
    /// Where the migration stream starts (after the header).
    stream_start: u64,
}

impl TempSaveFile {
    /// Create the temporary file (mode 0600, never an existing file) in `target`'s directory
    /// and write `header` to it; the file offset ends after the header.
    pub fn create(target: &Path, header: &SaveHeader) -> io::Result<Self> {
        Self::create_at(target, &temp_path_for(target)?, header)
    }

    /// As [`TempSaveFile::create`], under the temporary name `temp_path` chosen beforehand
    /// with [`temp_path_for`] (so it can be recorded before the file exists, §11.4).
    pub fn create_at(target: &Path, temp_path: &Path, header: &SaveHeader) -> io::Result<Self> {
        let temp_path = temp_path.to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp_path)?;
        let encoded = encode_header(header);
        let mut temp = TempSaveFile {
            file,
            temp_path,
            target: target.to_path_buf(),
            committed: false,
            stream_start: encoded.len() as u64,
        };
        temp.file.write_all(&encoded)?;
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
        // Seal the digest of what QEMU wrote into the header's digest line.
        let stream_start = self.stream_start;
        let digest = digest_from(&self.file, stream_start)?;
        self.file
            .write_all_at(&digest_line(digest), stream_start - DIGEST_LINE_LEN as u64)?;
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

/// Open a save file for restore: read and check its header and the stream's digest, and
/// leave the file offset at the start of the migration stream. A bad header or a damaged
/// stream is an `InvalidData` error carrying the [`SaveFileError`].
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
    let invalid = |e: SaveFileError| io::Error::new(io::ErrorKind::InvalidData, e);
    let (header, len) = parse_header(&buf[..filled]).map_err(invalid)?;
    let recorded =
        recorded_digest(&buf[..filled], len).ok_or_else(|| invalid(SaveFileError::Truncated))?;
    verify_stream(&file, len as u64, recorded).map_err(invalid)?;
    file.seek(SeekFrom::Start(len as u64))?;
    Ok((file, header))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SaveHeader {
        SaveHeader {
            format: FORMAT_VERSION,
            devices: None,
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
        assert_eq!(
            parse_header(b"DOMKIT-SAVE\n{\"format\":1,\"other\":1}\n"),
            Err(SaveFileError::NoDigest(1))
        );
    }

    #[test]
    fn a_flipped_bit_truncation_or_an_unsealed_digest_is_refused_before_qemu_reads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("web1.save");
        let mut temp = TempSaveFile::create(&target, &header()).expect("create");
        temp.file.write_all(&[0x5a; 100_000]).expect("stream");
        temp.commit().expect("commit");
        open_for_restore(&target).expect("a sealed, intact file");
        let good = std::fs::read(&target).expect("read");
        let damaged = |bytes: &[u8]| {
            std::fs::write(&target, bytes).expect("write");
            let err = open_for_restore(&target).expect_err("damaged");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            err.to_string()
        };
        let mut flipped = good.clone();
        let middle = good.len() - 50_000;
        flipped[middle] ^= 0x01;
        assert!(damaged(&flipped).contains("CRC-32"));
        assert!(damaged(&good[..good.len() - 1]).contains("truncated"));
        let (_, start) = parse_header(&good).expect("header");
        let mut unsealed = good.clone();
        unsealed[start - DIGEST_LINE_LEN..start]
            .copy_from_slice(&digest_line(StreamDigest { crc32: 0, len: 0 }));
        assert!(damaged(&unsealed).contains("damaged"));
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
