//! Checkpoints: towers, optimiser state and cache in one file.
//!
//! Layout (little-endian):
//!
//! ```text
//! magic   16 bytes  "NEGCACHE-CKPT\0\0\0"
//! version u32       FORMAT_VERSION
//! header  u32 n, then n bytes of JSON (the run's configuration and step)
//! body    u64 n, then n bytes: the sections written by the trainer
//! crc32   u32       over everything before it
//! ```
//!
//! A file is written to a temporary file in the same directory, synced,
//! then renamed over the old one, so a run killed while writing leaves the
//! previous checkpoint intact. Reading checks the magic, the version, every
//! length and the checksum before anything is used.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};

/// The checkpoint format's magic bytes.
pub const MAGIC: &[u8; 16] = b"NEGCACHE-CKPT\0\0\0";
/// The format version this build writes and reads.
/// Version 2: the cache section holds the configured capacity's slots
/// (version 1 held a fixed 65,536).
pub const FORMAT_VERSION: u32 = 2;

/// A checkpoint in memory: a JSON header and a binary body.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The run's configuration and progress, as JSON.
    pub header: serde_json::Value,
    /// The trainer's state.
    pub body: Vec<u8>,
}

impl Checkpoint {
    /// Serialises to bytes.
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let header = serde_json::to_vec(&self.header)?;
        let mut out = Vec::with_capacity(16 + 4 + 4 + header.len() + 8 + self.body.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&u32::try_from(header.len())?.to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(self.body.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parses bytes read from `what` (named in errors).
    pub fn from_bytes(bytes: &[u8], what: &str) -> anyhow::Result<Self> {
        let short = |need: usize| {
            anyhow::anyhow!("{what}: truncated checkpoint: needs at least {need} bytes, the file has {}", bytes.len())
        };
        if bytes.len() < 16 || &bytes[..16] != MAGIC {
            bail!("{what}: not a negcache checkpoint (the file does not start with the checkpoint magic)");
        }
        let u32_at = |at: usize| -> anyhow::Result<u32> {
            let b = bytes.get(at..at + 4).ok_or_else(|| short(at + 4))?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let version = u32_at(16)?;
        if version != FORMAT_VERSION {
            bail!("{what}: checkpoint format version {version}; this build reads version {FORMAT_VERSION}");
        }
        let hlen = u32_at(20)? as usize;
        let hend = 24 + hlen;
        let blen_bytes = bytes.get(hend..hend + 8).ok_or_else(|| short(hend + 8))?;
        let blen = u64::from_le_bytes(blen_bytes.try_into()?) as usize;
        let bstart = hend + 8;
        let end = bstart.checked_add(blen).ok_or_else(|| short(usize::MAX))?;
        if bytes.len() < end + 4 {
            return Err(short(end + 4));
        }
        if bytes.len() > end + 4 {
            bail!("{what}: {} unexpected bytes after the checkpoint's end", bytes.len() - end - 4);
        }
        let stored = u32_at(end)?;
        let actual = crc32fast::hash(&bytes[..end]);
        if stored != actual {
            bail!("{what}: checksum mismatch (stored {stored:08x}, computed {actual:08x}): the file is corrupted");
        }
        let header = serde_json::from_slice(&bytes[24..hend]).with_context(|| format!("{what}: header is not JSON"))?;
        Ok(Self { header, body: bytes[bstart..end].to_vec() })
    }

    /// Writes atomically to `path` (temporary file, sync, rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let bytes = self.to_bytes()?;
        write_atomically(path, |f| f.write_all(&bytes).map_err(Into::into))
    }

    /// Reads and checks `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }
}

/// The name prefix of every temporary file the host writes beside an
/// output (checkpoints, summaries, plots, metrics logs). A process killed
/// while writing leaves such a file behind; [`remove_stale_temp_files`]
/// removes them when the next run starts in that directory.
pub const TEMP_PREFIX: &str = ".negcache-tmp-";

/// Removes the temporary files ([`TEMP_PREFIX`]) that killed runs left in
/// `dir`, and returns how many there were. A missing `dir` has none. Two
/// runs must not write into the same directory at once: the second would
/// remove the first one's file in the middle of a write.
pub fn remove_stale_temp_files(dir: &Path) -> anyhow::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("{}: cannot list", dir.display()))),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let stale = entry.file_name().to_str().is_some_and(|n| n.starts_with(TEMP_PREFIX));
        if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
            let path = entry.path();
            std::fs::remove_file(&path)
                .with_context(|| format!("{}: cannot remove a temporary file left by a killed run", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes `path` through a temporary file in the same directory: if `fill`
/// fails or the process dies before the rename, `path` is untouched (a
/// killed process leaves a [`TEMP_PREFIX`] file, removed by the next run).
pub fn write_atomically(path: &Path, fill: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(TEMP_PREFIX);
    // Temporary files are owner-only by default; an output is created with
    // the mode any other file gets (0666 less the umask), like metrics.csv.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp =
        builder.tempfile_in(dir).with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        fill(&mut w).with_context(|| format!("{}: writing failed; the previous file is kept", path.display()))?;
        w.flush().with_context(|| format!("{}: writing failed; the previous file is kept", path.display()))?;
    }
    tmp.as_file().sync_all().with_context(|| format!("{}: cannot sync", path.display()))?;
    // The io::Error alone: a PersistError's message is its source's, and
    // would be printed twice.
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot rename the temporary file into place", path.display()))?;
    Ok(())
}

/// Appends little-endian numbers to a body.
#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// A section tag, checked on reading so that a mismatch is caught early.
    pub fn tag(&mut self, t: &[u8; 4]) {
        self.0.extend_from_slice(t);
    }
    /// f32 values.
    pub fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        v.iter().for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }
    /// u32 values.
    pub fn u32s(&mut self, v: &[u32]) {
        self.u64(v.len() as u64);
        v.iter().for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }
    /// One u64.
    pub fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    /// Raw bytes (int8 and bf16 values, already little-endian).
    pub fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
    }
}

/// Reads what a [`Writer`] wrote, with errors naming what was expected.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Reads from the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at + n).ok_or_else(|| {
            anyhow::anyhow!("checkpoint body ends at byte {} while {n} more were expected", self.bytes.len())
        })?;
        self.at += n;
        Ok(s)
    }
    /// Expects a section tag.
    pub fn tag(&mut self, t: &[u8; 4]) -> anyhow::Result<()> {
        let got = self.take(4)?;
        if got != t {
            bail!("checkpoint body: expected section {:?} at byte {}", String::from_utf8_lossy(t), self.at - 4);
        }
        Ok(())
    }
    /// One u64.
    pub fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    /// f32 values into `out`, whose length must match.
    pub fn f32s_into(&mut self, out: &mut [f32]) -> anyhow::Result<()> {
        let n = self.u64()? as usize;
        if n != out.len() {
            bail!("checkpoint body: a tensor of {n} values where this model has {}: the checkpoint is from another configuration", out.len());
        }
        for (x, b) in out.iter_mut().zip(self.take(4 * n)?.chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
    /// u32 values into `out`, whose length must match.
    pub fn u32s_into(&mut self, out: &mut [u32]) -> anyhow::Result<()> {
        let n = self.u64()? as usize;
        if n != out.len() {
            bail!("checkpoint body: {n} integers where {} were expected", out.len());
        }
        for (x, b) in out.iter_mut().zip(self.take(4 * n)?.chunks_exact(4)) {
            *x = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
    /// Raw bytes into `out`, whose length must match.
    pub fn bytes_into(&mut self, out: &mut [u8]) -> anyhow::Result<()> {
        let n = self.u64()? as usize;
        if n != out.len() {
            bail!("checkpoint body: {n} bytes of stored embeddings where {} were expected: the checkpoint is from another configuration", out.len());
        }
        out.copy_from_slice(self.take(n)?);
        Ok(())
    }
    /// Whether every byte was read.
    pub fn finish(&self) -> anyhow::Result<()> {
        if self.at != self.bytes.len() {
            bail!(
                "checkpoint body: {} bytes left over: the checkpoint is from another configuration",
                self.bytes.len() - self.at
            );
        }
        Ok(())
    }
}
