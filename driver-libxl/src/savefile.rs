//! domkit's libxl save file: a small header, then libxl's own save stream.
//!
//! Layout: `DOMKIT-LIBXL-SAVE\n` (18 bytes of magic), a little-endian `u32` length, that many
//! bytes of JSON ([`SaveHeader`]), then the stream `libxl_domain_suspend` writes. libxl and its
//! save helper write and read the fd sequentially from its current offset (no `lseek`,
//! checked on the real host by `t11_save_restore_keeps_identity`), so the stream simply
//! follows the header and a restore hands libxl the fd positioned right after it.
//!
//! Writing is crash- and failure-safe: [`SaveTarget::create`] makes the temporary file in the
//! destination's directory first (an unwritable directory fails before the domain is
//! touched); [`SaveTarget::persist`] fsyncs and renames it over the destination; dropping a
//! `SaveTarget` removes the temporary file, so a failed save leaves any older file alone.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// The magic at offset 0.
pub const MAGIC: &[u8; 18] = b"DOMKIT-LIBXL-SAVE\n";
/// The header format written by this version.
pub const FORMAT: u32 = 1;
/// The largest header JSON accepted when reading (a corrupt length must not allocate GiBs).
pub const MAX_HEADER_LEN: u32 = 1 << 20;

/// The JSON header of a save file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveHeader {
    /// Header format ([`FORMAT`]).
    pub format: u32,
    /// Always `"libxl"`.
    pub backend: String,
    /// The domain's name.
    pub name: String,
    /// The domain's uuid.
    pub uuid: uuid::Uuid,
    /// The vCPUs were paused (through the API) when saved: a restore keeps them paused.
    pub was_paused: bool,
    /// The Xen domid at save time (information only).
    pub domid: u32,
    /// When it was saved, microseconds since the Unix epoch.
    pub saved_at_us: u64,
}

/// What can be wrong with a save file.
#[derive(Debug, thiserror::Error)]
pub enum SaveFileError {
    /// Reading or writing failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a domkit libxl save file (or is damaged).
    #[error("{path}: {problem}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

/// A save in progress: the open temporary file next to the destination.
#[derive(Debug)]
pub struct SaveTarget {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl SaveTarget {
    /// Create the temporary file in `dest`'s directory (fails if it is not writable, if it
    /// does not exist, or if `dest` is a directory).
    pub fn create(dest: &Path) -> Result<Self, SaveFileError> {
        let io = |context: String| move |source| SaveFileError::Io { context, source };
        if dest.is_dir() {
            return Err(SaveFileError::Io {
                context: format!("saving to {}", dest.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the destination is a directory: give a file name",
                ),
            });
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let prefix = format!(
            ".{}.",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "save".into())
        );
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(io(format!(
                "creating a temporary save file in {} (is the directory there and writable?)",
                dir.display()
            )))?;
        Ok(SaveTarget {
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// Write the header; the file offset is then where libxl's stream starts.
    pub fn write_header(&mut self, header: &SaveHeader) -> Result<(), SaveFileError> {
        let path = self.tmp.path().to_path_buf();
        let json = serde_json::to_vec(header).map_err(|e| SaveFileError::Format {
            path: path.clone(),
            problem: format!("cannot encode the header: {e}"),
        })?;
        let mut buf = Vec::with_capacity(MAGIC.len() + 4 + json.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
        buf.extend_from_slice(&json);
        self.tmp
            .as_file_mut()
            .write_all(&buf)
            .map_err(|source| SaveFileError::Io {
                context: format!("writing the save header to {}", path.display()),
                source,
            })
    }

    /// The fd libxl writes its stream to.
    pub fn raw_fd(&self) -> RawFd {
        self.tmp.as_file().as_raw_fd()
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// fsync the file, rename it over the destination, fsync the directory.
    pub fn persist(self) -> Result<(), SaveFileError> {
        let dest = self.dest.clone();
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|source| SaveFileError::Io {
                context: format!("flushing the save file for {}", dest.display()),
                source,
            })?;
        self.tmp.persist(&dest).map_err(|e| SaveFileError::Io {
            context: format!("renaming the save file to {}", dest.display()),
            source: e.error,
        })?;
        if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Open a save file and read its header; the returned file is positioned at libxl's stream.
pub fn open(path: &Path) -> Result<(File, SaveHeader), SaveFileError> {
    let mut f = File::open(path).map_err(|source| SaveFileError::Io {
        context: format!("opening save file {}", path.display()),
        source,
    })?;
    let header = read_header(&mut f, path)?;
    check_stream_start(&mut f, path)?;
    Ok((f, header))
}

/// The ident a libxl migration v2 stream starts with (`RESTORE_STREAM_IDENT`, big-endian).
pub const LIBXL_STREAM_IDENT: &[u8; 8] = b"LibxlFmt";
/// The libxl stream version written by Xen 4.17 (`RESTORE_STREAM_VERSION`).
pub const LIBXL_STREAM_VERSION: u32 = 2;

/// Check that libxl's stream header follows at the file's current offset (without moving it):
/// `LibxlFmt`, version 2. libxl 4.17 crashed the process (SIGSEGV, seen on the test host) when
/// handed a stream with a bad header, so a damaged file is refused before libxl sees it.
pub fn check_stream_start(f: &mut File, path: &Path) -> Result<(), SaveFileError> {
    use std::io::Seek;
    use std::os::unix::fs::FileExt;
    let io = |source| SaveFileError::Io {
        context: format!("reading the libxl stream header of {}", path.display()),
        source,
    };
    let pos = f.stream_position().map_err(io)?;
    let mut hdr = [0u8; 16];
    let mut got = 0;
    while got < hdr.len() {
        let n = f.read_at(&mut hdr[got..], pos + got as u64).map_err(io)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    check_stream_header(&hdr[..got]).map_err(|problem| SaveFileError::Format {
        path: path.to_path_buf(),
        problem,
    })
}

/// Check the first 16 bytes of a libxl stream (ident, version, options).
pub fn check_stream_header(hdr: &[u8]) -> Result<(), String> {
    if hdr.len() < 16 {
        return Err("truncated: the libxl stream is missing after the header".into());
    }
    if &hdr[..8] != LIBXL_STREAM_IDENT {
        return Err(format!(
            "no libxl stream after the header (ident {:02x?}, want \"LibxlFmt\"): damaged file",
            &hdr[..8]
        ));
    }
    let version = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if version != LIBXL_STREAM_VERSION {
        return Err(format!(
            "libxl stream version {version} is not supported (want {LIBXL_STREAM_VERSION})"
        ));
    }
    Ok(())
}

/// Read and check the header from `r` (positioned at offset 0).
pub fn read_header(r: &mut impl Read, path: &Path) -> Result<SaveHeader, SaveFileError> {
    let bad = |problem: String| SaveFileError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let mut magic = [0u8; 18];
    read_exact(r, &mut magic, path, "the magic")?;
    if &magic != MAGIC {
        return Err(bad(
            "not a domkit libxl save file (bad magic); was it written by another backend or by \
             `xl save`?"
                .into(),
        ));
    }
    let mut len = [0u8; 4];
    read_exact(r, &mut len, path, "the header length")?;
    let len = u32::from_le_bytes(len);
    if len == 0 || len > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {len} is out of range (damaged file?)"
        )));
    }
    let mut json = vec![0u8; len as usize];
    read_exact(r, &mut json, path, "the header")?;
    let header: SaveHeader =
        serde_json::from_slice(&json).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    if header.format != FORMAT {
        return Err(bad(format!(
            "header format {} is not supported (this domkit reads format {FORMAT})",
            header.format
        )));
    }
    if header.backend != "libxl" {
        return Err(bad(format!(
            "saved by the {:?} backend, not libxl",
            header.backend
        )));
    }
    Ok(header)
}

fn read_exact(
    r: &mut impl Read,
    buf: &mut [u8],
    path: &Path,
    what: &str,
) -> Result<(), SaveFileError> {
    r.read_exact(buf).map_err(|source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            SaveFileError::Format {
                path: path.to_path_buf(),
                problem: format!("truncated: ends inside {what}"),
            }
        } else {
            SaveFileError::Io {
                context: format!("reading {what} of {}", path.display()),
                source,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Seek, SeekFrom};

    fn header() -> SaveHeader {
        SaveHeader {
            format: FORMAT,
            backend: "libxl".into(),
            name: "web1".into(),
            uuid: uuid::Uuid::nil(),
            was_paused: true,
            domid: 7,
            saved_at_us: 1,
        }
    }

    #[test]
    fn header_roundtrip_leaves_the_offset_at_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.save");
        let mut t = SaveTarget::create(&dest).unwrap();
        t.write_header(&header()).unwrap();
        let mut f = t.tmp.as_file().try_clone().unwrap();
        f.write_all(b"LibxlFmt\0\0\0\x02\0\0\0\0-STREAM").unwrap();
        t.persist().unwrap();
        let (mut f, h) = open(&dest).unwrap();
        assert_eq!(h, header());
        let mut rest = String::new();
        f.read_to_string(&mut rest).unwrap();
        assert_eq!(rest.as_bytes(), b"LibxlFmt\0\0\0\x02\0\0\0\0-STREAM");
        let _ = f.seek(SeekFrom::Start(0));
    }

    #[test]
    fn libxl_stream_header_is_checked() {
        assert!(check_stream_header(b"LibxlFmt\0\0\0\x02\0\0\0\0").is_ok());
        assert!(check_stream_header(&[0u8; 16]).is_err());
        assert!(check_stream_header(b"LibxlFmt\0\0\0\x01\0\0\0\0").is_err());
        assert!(check_stream_header(b"LibxlFmt").is_err());
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.save");
        let mut t = SaveTarget::create(&dest).unwrap();
        t.write_header(&header()).unwrap();
        t.persist().unwrap();
        let e = open(&dest).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn dropping_a_target_keeps_the_old_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.save");
        std::fs::write(&dest, b"old").unwrap();
        let mut t = SaveTarget::create(&dest).unwrap();
        t.write_header(&header()).unwrap();
        let tmp = t.temp_path().to_path_buf();
        assert!(tmp.exists());
        assert_eq!(tmp.parent(), dest.parent());
        drop(t);
        assert!(!tmp.exists());
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_directory_or_directory_destination_fails_early() {
        let e = SaveTarget::create(Path::new("/nonexistent-domkit-dir/x.save")).unwrap_err();
        assert!(matches!(e, SaveFileError::Io { .. }), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = SaveTarget::create(dir.path()).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn bad_files_are_format_errors_not_panics() {
        let p = Path::new("f");
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            b"DOMKIT".to_vec(),
            b"XXXXXXXXXXXXXXXXXX\x02\0\0\0{}".to_vec(),
            [MAGIC.as_slice(), &[0, 0, 0, 0]].concat(),
            [MAGIC.as_slice(), &[0xff, 0xff, 0xff, 0xff]].concat(),
            [MAGIC.as_slice(), &[10, 0, 0, 0], b"{}"].concat(),
            [MAGIC.as_slice(), &[2, 0, 0, 0], b"[]"].concat(),
        ];
        for c in cases {
            let e = read_header(&mut Cursor::new(c.clone()), p).unwrap_err();
            assert!(matches!(e, SaveFileError::Format { .. }), "{c:?}: {e}");
        }
        let mut other = header();
        other.backend = "qemu".into();
        let json = serde_json::to_vec(&other).unwrap();
        let bytes = [MAGIC.as_slice(), &(json.len() as u32).to_le_bytes(), &json].concat();
        let e = read_header(&mut Cursor::new(bytes), p).unwrap_err();
        assert!(e.to_string().contains("qemu"), "{e}");
    }
}
