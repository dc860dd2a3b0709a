//! What a valid overlay is: one answer, shared by every tool.
//!
//! `cloudlet overlay inspect` and `verify`, the registry's push check and
//! the daemon's check before it fetches segments all ask [`Validation`],
//! so that they agree on every file. A validation checks, in this order:
//!
//! | level | what | needs |
//! |---|---|---|
//! | [`Level::Structure`] | the header (magic, version, hash, fields) | the first bytes |
//! | | the manifest (hash, zstd frame, encoding, every cross reference) | the bytes up to the manifest's end ([`Validation::prefix_len`]) |
//! | | the app metadata ([`check_metadata`]) | |
//! | | the base id, when an expected base is given ([`Validation::base`]) | |
//! | | the exact length: nothing missing, nothing after the last segment | the overlay's length |
//! | [`Level::Full`] | all of the above, then every segment's stored bytes against its hash | every byte |
//!
//! Errors are [`InvalidOverlay`]; each message says what is wrong and where
//! ("Segment 3 hash mismatch ...", "Trailing data: 1 byte after the last
//! segment ...", "Overlay is for base A, this base is B", "Metadata: ...").
//!
//! Three ways in, one set of checks:
//!
//! - [`Validation::check_file`]: a local file (inspect, verify).
//! - [`Validation::stream`]: bytes as they go by, nothing but the header and
//!   manifest kept (the registry's push).
//! - [`Validation::check_prefix`]: the header and manifest and the length,
//!   before any segment is fetched (the daemon; it checks each segment with
//!   [`check_segment`] as it arrives).
//!
//! `verify` goes further than [`Level::Full`]: it also checks the base
//! images' hashes, every rebuilt chunk and the launch-state hash, which needs
//! the base ([`crate::verify`]).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::format::{FormatError, Header, Manifest, HEADER_LEN, MAX_MANIFEST_RAW_LEN};
use crate::signature::{Signature, SignatureError, SignaturePolicy};

/// How much of an overlay a [`Validation`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    /// Header, manifest, app metadata, base id and length: what can be
    /// known from the first bytes and the overlay's length.
    Structure,
    /// The structure and every segment's hash: reads every byte.
    #[default]
    Full,
}

/// Where in an overlay a byte is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Header,
    Manifest,
    Segment(u32),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Header => write!(f, "the header"),
            Place::Manifest => write!(f, "the manifest"),
            Place::Segment(i) => write!(f, "segment {i}"),
        }
    }
}

/// Why an overlay is not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidOverlay {
    /// The header or the manifest is damaged.
    #[error(transparent)]
    Format(FormatError),
    #[error("Overlay truncated at byte {at}, in {place}{}", expected(.place, .file_len))]
    Truncated {
        /// The overlay's length (where it ends).
        at: u64,
        place: Place,
        /// The length the header announces, once the header is readable.
        file_len: Option<u64>,
    },
    #[error("Trailing data: {} after the last segment, from byte {offset}", bytes(.extra))]
    TrailingData { offset: u64, extra: u64 },
    #[error("Overlay is for base {overlay}, this base is {expected}")]
    WrongBase { overlay: String, expected: String },
    #[error("Metadata: {reason}")]
    Metadata { reason: String },
    #[error("Segment {segment} hash mismatch (bytes {start}..{end}): the segment is corrupted")]
    SegmentHashMismatch { segment: u32, start: u64, end: u64 },
    #[error("Header and manifest take {needed} bytes, more than the {limit} bytes accepted here")]
    PrefixTooLarge { needed: u64, limit: u64 },
    #[error("Overlay already refused")]
    Refused,
    /// Its signature is refused by the reader's [`SignaturePolicy`].
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

fn expected(place: &Place, file_len: &Option<u64>) -> String {
    match (place, file_len) {
        (_, Some(n)) => format!(" (the header says {n} bytes)"),
        (Place::Header, None) => format!(" (the header is {HEADER_LEN} bytes)"),
        (_, None) => String::new(),
    }
}

fn bytes(n: &u64) -> String {
    if *n == 1 {
        "1 byte".into()
    } else {
        format!("{n} bytes")
    }
}

impl From<FormatError> for InvalidOverlay {
    fn from(e: FormatError) -> Self {
        InvalidOverlay::Format(e)
    }
}

/// Why a file could not be validated: unreadable, or not a valid overlay.
#[derive(Debug, thiserror::Error)]
pub enum ValidateOverlayError {
    #[error("Cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidOverlay),
}

/// An overlay that passed a [`Validation`].
#[derive(Debug, Clone)]
pub struct ValidOverlay {
    pub header: Header,
    pub manifest: Manifest,
    /// The app metadata, if the overlay carries any.
    pub app: Option<AppMetadata>,
    /// Its signature (format version 2), if signed; checked against a
    /// policy only when the validation has one ([`Validation::signatures`]).
    pub signature: Option<Signature>,
}

impl ValidOverlay {
    /// Size of the whole overlay file.
    pub fn size(&self) -> u64 {
        self.header.file_len
    }
}

/// The app metadata an overlay's manifest carries: JSON of this object
/// (the daemon reads it as `cloudlet_api::AppInfo`). Unknown fields are
/// ignored, for later additions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppMetadata {
    /// The app's name: 1 to 128 bytes, no control characters.
    pub name: String,
    /// Guest TCP ports the app serves (1-65535, each once; may be empty).
    pub ports: Vec<u16>,
    /// HTTP path that answers when the app is ready: starts with `/`, at
    /// most 1024 bytes, no spaces or control characters.
    #[serde(default)]
    pub health_path: Option<String>,
    /// The command the app was started with (for the record).
    #[serde(default)]
    pub command: Option<String>,
    /// The app's version, as its developer names it (1 to 64 bytes, no
    /// control characters); a signature covers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

const MAX_APP_NAME_LEN: usize = 128;
const MAX_APP_VERSION_LEN: usize = 64;
const MAX_HEALTH_PATH_LEN: usize = 1024;

/// Checks an overlay's app metadata: empty (no app), or JSON of
/// [`AppMetadata`] within its rules. Returns the app, if any.
pub fn check_metadata(metadata: &[u8]) -> Result<Option<AppMetadata>, InvalidOverlay> {
    let bad = |reason: String| InvalidOverlay::Metadata { reason };
    if metadata.is_empty() {
        return Ok(None);
    }
    let text = std::str::from_utf8(metadata).map_err(|e| {
        bad(format!(
            "not UTF-8 text (invalid byte at {})",
            e.valid_up_to()
        ))
    })?;
    let app: AppMetadata = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "not the app's JSON object {{name, ports, health_path, command}}: {e}"
        ))
    })?;
    if app.name.is_empty() || app.name.len() > MAX_APP_NAME_LEN {
        return Err(bad(format!(
            "app name must be 1 to {MAX_APP_NAME_LEN} bytes, it is {}",
            app.name.len()
        )));
    }
    if app.name.chars().any(char::is_control) {
        return Err(bad(format!(
            "app name {:?} holds control characters",
            app.name
        )));
    }
    if let Some(v) = &app.version {
        if v.is_empty() || v.len() > MAX_APP_VERSION_LEN || v.chars().any(char::is_control) {
            return Err(bad(format!(
                "app version {:?} must be 1 to {MAX_APP_VERSION_LEN} bytes, no control characters",
                v.chars().take(80).collect::<String>()
            )));
        }
    }
    for (i, &p) in app.ports.iter().enumerate() {
        if p == 0 {
            return Err(bad("port 0 is not a TCP port".into()));
        }
        if app.ports[..i].contains(&p) {
            return Err(bad(format!("port {p} is listed twice")));
        }
    }
    if let Some(h) = &app.health_path {
        if !h.starts_with('/')
            || h.len() > MAX_HEALTH_PATH_LEN
            || h.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad(format!(
                "health path {:?} is not an HTTP path (/..., at most {MAX_HEALTH_PATH_LEN} bytes, no spaces)",
                h.chars().take(80).collect::<String>()
            )));
        }
    }
    Ok(Some(app))
}

/// Checks one whole stored segment (`segment` of `manifest`) against its
/// hash: what [`Level::Full`] does for each, for a caller that receives
/// segments one by one.
pub fn check_segment(
    manifest: &Manifest,
    segment: u32,
    stored: &[u8],
) -> Result<(), InvalidOverlay> {
    let Some(info) = manifest.segments.get(segment as usize) else {
        return Err(mismatch(manifest, segment));
    };
    if (stored.len() as u64) < info.stored_len {
        let start = manifest.data_offset + info.offset;
        return Err(InvalidOverlay::Truncated {
            at: start + stored.len() as u64,
            place: Place::Segment(segment),
            file_len: None,
        });
    }
    if blake3::hash(stored).as_bytes() != &info.hash {
        return Err(mismatch(manifest, segment));
    }
    Ok(())
}

fn mismatch(manifest: &Manifest, segment: u32) -> InvalidOverlay {
    let r = manifest.segment_range(segment).unwrap_or(0..0);
    InvalidOverlay::SegmentHashMismatch {
        segment,
        start: r.start,
        end: r.end,
    }
}

/// Where byte `offset` of an overlay lies.
fn place_of(manifest: &Manifest, offset: u64) -> Place {
    if offset < HEADER_LEN as u64 {
        return Place::Header;
    }
    if offset < manifest.data_offset {
        return Place::Manifest;
    }
    let n = manifest.segments.len() as u32;
    (0..n)
        .find(|&i| manifest.segment_range(i).is_some_and(|r| offset < r.end))
        .map_or(Place::Segment(n.saturating_sub(1)), Place::Segment)
}

/// Largest header plus stored manifest accepted by default.
pub const DEFAULT_MAX_PREFIX_LEN: u64 = HEADER_LEN as u64 + MAX_MANIFEST_RAW_LEN;

/// A validation: a [`Level`], an optional expected base id, a limit on the
/// bytes held in memory. `Validation::default()` is [`Level::Full`], any base.
#[derive(Debug, Clone)]
pub struct Validation {
    level: Level,
    base_id: Option<String>,
    max_prefix_len: u64,
    signatures: Option<(SignaturePolicy, u64)>,
}

impl Default for Validation {
    fn default() -> Self {
        Validation::new(Level::Full)
    }
}

impl Validation {
    pub fn new(level: Level) -> Validation {
        Validation {
            level,
            base_id: None,
            max_prefix_len: DEFAULT_MAX_PREFIX_LEN,
            signatures: None,
        }
    }

    /// Judge the overlay's signature by `policy` at Unix time `now`, with
    /// the header and manifest (before any segment).
    pub fn signatures(mut self, policy: SignaturePolicy, now: u64) -> Validation {
        self.signatures = Some((policy, now));
        self
    }

    /// [`Level::Structure`].
    pub fn structure() -> Validation {
        Validation::new(Level::Structure)
    }

    /// [`Level::Full`].
    pub fn full() -> Validation {
        Validation::new(Level::Full)
    }

    /// The overlay must be for the base with this id.
    pub fn base(mut self, id: impl Into<String>) -> Validation {
        self.base_id = Some(id.into());
        self
    }

    /// Refuse overlays whose header and stored manifest take more than
    /// `limit` bytes (they are held in memory).
    pub fn prefix_limit(mut self, limit: u64) -> Validation {
        self.max_prefix_len = limit;
        self
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// How many first bytes [`check_prefix`](Self::check_prefix) needs
    /// (the header and the stored manifest), from the first
    /// [`HEADER_LEN`] bytes (fewer if the overlay is shorter).
    pub fn prefix_len(&self, head: &[u8]) -> Result<u64, InvalidOverlay> {
        let header = parse_header(head)?;
        let needed = header.manifest_range().end;
        if needed > self.max_prefix_len {
            return Err(InvalidOverlay::PrefixTooLarge {
                needed,
                limit: self.max_prefix_len,
            });
        }
        Ok(needed)
    }

    /// Checks the structure of an overlay of `len` bytes from its first
    /// bytes: `prefix` holds at least [`prefix_len`](Self::prefix_len)
    /// bytes (or the whole overlay when it is shorter). With `len == None`
    /// (not known yet) the length is the caller's to check, as the bytes
    /// arrive. Segments are not checked here, whatever the level: see
    /// [`check_segment`].
    pub fn check_prefix(
        &self,
        prefix: &[u8],
        len: Option<u64>,
    ) -> Result<ValidOverlay, InvalidOverlay> {
        let header = parse_header(&prefix[..prefix.len().min(HEADER_LEN)])?;
        let end = self.prefix_len(prefix)?;
        if (prefix.len() as u64) < end {
            return Err(InvalidOverlay::Truncated {
                at: prefix.len() as u64,
                place: Place::Manifest,
                file_len: Some(header.file_len),
            });
        }
        let r = header.manifest_range();
        let manifest = Manifest::parse(&header, &prefix[r.start as usize..r.end as usize])?;
        let app = check_metadata(&manifest.metadata)?;
        let s = header.signature_range();
        let signature = (!s.is_empty())
            .then(|| Signature::parse(&prefix[s.start as usize..s.end as usize]))
            .transpose()?;
        if let Some(expected) = &self.base_id {
            if &manifest.base_id != expected {
                return Err(InvalidOverlay::WrongBase {
                    overlay: manifest.base_id.clone(),
                    expected: expected.clone(),
                });
            }
        }
        let v = ValidOverlay {
            header,
            manifest,
            app,
            signature,
        };
        if let Some((policy, now)) = &self.signatures {
            policy.check(&v, *now)?;
        }
        if let Some(len) = len {
            check_len(&v, len)?;
        }
        Ok(v)
    }

    /// Validates the overlay file at `path`. At [`Level::Full`] it is read
    /// once from start to end; at [`Level::Structure`] only its header and
    /// manifest are.
    pub fn check_file(&self, path: &Path) -> Result<ValidOverlay, ValidateOverlayError> {
        let read = |source| ValidateOverlayError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(read)?;
        let len = file.metadata().map_err(read)?.len();
        if self.level == Level::Structure {
            let mut head = Vec::new();
            (&mut file)
                .take(HEADER_LEN as u64)
                .read_to_end(&mut head)
                .map_err(read)?;
            let needed = self.prefix_len(&head)?;
            let mut prefix = head;
            (&mut file)
                .take(needed.saturating_sub(prefix.len() as u64))
                .read_to_end(&mut prefix)
                .map_err(read)?;
            return Ok(self.check_prefix(&prefix, Some(len))?);
        }
        let mut s = self.stream();
        s.expect_len(len);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(read)?;
            if n == 0 {
                break;
            }
            s.feed(&buf[..n])?;
        }
        Ok(s.finish()?)
    }

    /// Validates an overlay held in memory.
    pub fn check_bytes(&self, bytes: &[u8]) -> Result<ValidOverlay, InvalidOverlay> {
        if self.level == Level::Structure {
            return self.check_prefix(bytes, Some(bytes.len() as u64));
        }
        let mut s = self.stream();
        s.expect_len(bytes.len() as u64);
        s.feed(bytes)?;
        s.finish()
    }

    /// A validator to [`feed`](OverlayStream::feed) bytes as they go by.
    pub fn stream(&self) -> OverlayStream {
        OverlayStream {
            validation: self.clone(),
            len: None,
            state: State::Prefix(Vec::new()),
        }
    }
}

/// The header from the first bytes; too few of them is a truncation.
fn parse_header(head: &[u8]) -> Result<Header, InvalidOverlay> {
    match Header::parse(head) {
        Err(FormatError::Truncated { .. }) => Err(InvalidOverlay::Truncated {
            at: head.len() as u64,
            place: Place::Header,
            file_len: None,
        }),
        r => Ok(r?),
    }
}

/// The overlay is exactly as long as its header says.
fn check_len(v: &ValidOverlay, len: u64) -> Result<(), InvalidOverlay> {
    let file_len = v.header.file_len;
    if len < file_len {
        return Err(InvalidOverlay::Truncated {
            at: len,
            place: place_of(&v.manifest, len),
            file_len: Some(file_len),
        });
    }
    if len > file_len {
        return Err(InvalidOverlay::TrailingData {
            offset: file_len,
            extra: len - file_len,
        });
    }
    Ok(())
}

/// A validation of bytes as they go by: [`feed`](Self::feed) the overlay
/// in pieces, then [`finish`](Self::finish). Holds the header and manifest
/// only. After an error, refuses everything.
#[derive(Debug)]
pub struct OverlayStream {
    validation: Validation,
    len: Option<u64>,
    state: State,
}

#[derive(Debug)]
enum State {
    Prefix(Vec<u8>),
    Segments(Box<Streaming>),
    Failed,
}

#[derive(Debug)]
struct Streaming {
    parsed: ValidOverlay,
    hash: bool,
    /// Absolute offset of the next byte.
    pos: u64,
    /// Index of the segment being read (`segments.len()` when done).
    segment: usize,
    segment_end: u64,
    hasher: blake3::Hasher,
}

impl OverlayStream {
    /// The whole overlay will be `len` bytes (a `Content-Length`, a file's
    /// size): checked as soon as the header is known. Call before feeding.
    pub fn expect_len(&mut self, len: u64) {
        self.len = Some(len);
    }

    /// The header, once the header and manifest have passed.
    pub fn header(&self) -> Option<&Header> {
        match &self.state {
            State::Segments(s) => Some(&s.parsed.header),
            _ => None,
        }
    }

    /// Checks the next bytes.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), InvalidOverlay> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        self.state = self.advance(state, bytes)?;
        Ok(())
    }

    fn advance(&self, state: State, mut bytes: &[u8]) -> Result<State, InvalidOverlay> {
        let mut prefix = match state {
            State::Failed => return Err(InvalidOverlay::Refused),
            State::Segments(mut s) => {
                s.feed(bytes)?;
                return Ok(State::Segments(s));
            }
            State::Prefix(p) => p,
        };
        let v = &self.validation;
        loop {
            let needed = if prefix.len() < HEADER_LEN {
                HEADER_LEN as u64
            } else {
                v.prefix_len(&prefix)?
            };
            let take = (needed as usize - prefix.len()).min(bytes.len());
            prefix.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if prefix.len() < HEADER_LEN {
                // Refuse garbage as early as its first bytes show it.
                match Header::parse(&prefix) {
                    Err(FormatError::Truncated { .. }) | Ok(_) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if (prefix.len() as u64) < needed {
                return Ok(State::Prefix(prefix));
            }
            if needed == HEADER_LEN as u64 {
                // The header is complete: once more to learn where the
                // manifest ends.
                continue;
            }
            let parsed = v.check_prefix(&prefix, self.len)?;
            let mut s = Box::new(Streaming::new(parsed, v.level == Level::Full));
            s.feed(bytes)?;
            return Ok(State::Segments(s));
        }
    }

    /// Checks that the overlay ended where its header says, every segment
    /// checked (at [`Level::Full`]).
    pub fn finish(self) -> Result<ValidOverlay, InvalidOverlay> {
        match self.state {
            State::Prefix(p) => {
                // Fewer bytes than the header and manifest: say what is
                // wrong with them, which includes where they end.
                self.validation.check_prefix(&p, Some(p.len() as u64))?;
                Err(InvalidOverlay::Truncated {
                    at: p.len() as u64,
                    place: Place::Manifest,
                    file_len: None,
                })
            }
            State::Segments(s) => {
                let file_len = s.parsed.header.file_len;
                if s.pos < file_len {
                    return Err(InvalidOverlay::Truncated {
                        at: s.pos,
                        place: place_of(&s.parsed.manifest, s.pos),
                        file_len: Some(file_len),
                    });
                }
                Ok(s.parsed)
            }
            State::Failed => Err(InvalidOverlay::Refused),
        }
    }
}

impl Streaming {
    fn new(parsed: ValidOverlay, hash: bool) -> Streaming {
        let pos = parsed.manifest.data_offset;
        let mut s = Streaming {
            parsed,
            hash,
            pos,
            segment: 0,
            segment_end: pos,
            hasher: blake3::Hasher::new(),
        };
        s.segment_end = s.end_of(0);
        s
    }

    fn end_of(&self, segment: usize) -> u64 {
        let m = &self.parsed.manifest;
        match m.segments.get(segment) {
            Some(seg) => m.data_offset + seg.offset + seg.stored_len,
            None => self.parsed.header.file_len,
        }
    }

    /// Checks every segment that is complete at the current position.
    fn close_segments(&mut self) -> Result<(), InvalidOverlay> {
        let m = &self.parsed.manifest;
        while self.segment < m.segments.len() && self.pos == self.segment_end {
            if self.hash && self.hasher.finalize().as_bytes() != &m.segments[self.segment].hash {
                return Err(mismatch(m, self.segment as u32));
            }
            self.hasher.reset();
            self.segment += 1;
            self.segment_end = self.end_of(self.segment);
        }
        Ok(())
    }

    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidOverlay> {
        self.close_segments()?;
        while !bytes.is_empty() {
            if self.segment >= self.parsed.manifest.segments.len() {
                return Err(InvalidOverlay::TrailingData {
                    offset: self.pos,
                    extra: bytes.len() as u64,
                });
            }
            let n = ((self.segment_end - self.pos) as usize).min(bytes.len());
            if self.hash {
                self.hasher.update(&bytes[..n]);
            }
            self.pos += n as u64;
            bytes = &bytes[n..];
            self.close_segments()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_rules() {
        assert_eq!(check_metadata(b"").unwrap(), None);
        let ok =
            check_metadata(br#"{"name":"kv","ports":[8080,22],"health_path":"/health","extra":1}"#)
                .unwrap()
                .unwrap();
        assert_eq!(ok.ports, [8080, 22]);
        let cases: [(&[u8], &str); 10] = [
            (b"\xff\xfe", "not UTF-8"),
            (b"hello", "not the app's JSON"),
            (br#"{"ports":[1]}"#, "missing field `name`"),
            (br#"{"name":"a","ports":[70000]}"#, "expected u16"),
            (br#"{"name":"","ports":[]}"#, "app name"),
            (br#"{"name":"a\u0007","ports":[]}"#, "control"),
            (br#"{"name":"a","ports":[0]}"#, "port 0"),
            (
                br#"{"name":"a","ports":[80,80]}"#,
                "port 80 is listed twice",
            ),
            (
                br#"{"name":"a","ports":[80],"health_path":"health"}"#,
                "health path",
            ),
            (
                br#"{"name":"a","ports":[80],"health_path":"/a b"}"#,
                "health path",
            ),
        ];
        for (bad, says) in cases {
            let e = check_metadata(bad).unwrap_err().to_string();
            assert!(e.starts_with("Metadata: ") && e.contains(says), "{e}");
        }
    }

    #[test]
    fn messages_say_where() {
        let e = InvalidOverlay::TrailingData {
            offset: 900,
            extra: 1,
        };
        assert_eq!(
            e.to_string(),
            "Trailing data: 1 byte after the last segment, from byte 900"
        );
        let e = InvalidOverlay::Truncated {
            at: 50,
            place: Place::Segment(3),
            file_len: Some(90),
        };
        assert_eq!(
            e.to_string(),
            "Overlay truncated at byte 50, in segment 3 (the header says 90 bytes)"
        );
    }
}
