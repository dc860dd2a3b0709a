//! Reading an overlay from where it lives: an `http(s)://` URL (range
//! requests: header and manifest first, then the segments as one stream) or
//! a file that was uploaded to the daemon.

use std::path::PathBuf;

use bytes::Bytes;
use cloudlet_overlay::format::{Header, HEADER_LEN};
use cloudlet_overlay::Manifest;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// How many bytes the first request asks for: the header and, usually, the
/// whole manifest, in one round trip.
const FIRST_FETCH: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchOverlayError {
    #[error("Overlay URL {url} is not http(s)")]
    Scheme { url: String },
    #[error("Cannot reach {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("Reading the overlay failed at byte {offset}: {detail}")]
    Read { offset: u64, detail: String },
    #[error("The overlay ended at byte {got}, expected {expected}")]
    Truncated { got: u64, expected: u64 },
    #[error("Not an overlay: {0}")]
    Format(#[from] cloudlet_overlay::FormatError),
}

/// Where an overlay comes from.
#[derive(Debug, Clone)]
pub enum OverlaySource {
    Url {
        client: reqwest::Client,
        url: String,
    },
    File(PathBuf),
}

impl OverlaySource {
    pub fn describe(&self) -> String {
        match self {
            OverlaySource::Url { url, .. } => url.clone(),
            OverlaySource::File(p) => format!("upload ({})", p.display()),
        }
    }

    /// Bytes `[start, end)`; `end == None` means to the end of the overlay.
    async fn range(&self, start: u64, end: Option<u64>) -> Result<ByteStream, FetchOverlayError> {
        match self {
            OverlaySource::Url { client, url } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(FetchOverlayError::Scheme { url: url.clone() });
                }
                let range = match end {
                    Some(e) => format!("bytes={start}-{}", e.saturating_sub(1)),
                    None => format!("bytes={start}-"),
                };
                let resp = client
                    .get(url)
                    .header(reqwest::header::RANGE, range)
                    .send()
                    .await
                    .map_err(|e| FetchOverlayError::Connect {
                        url: url.clone(),
                        detail: crate::error_chain(&e),
                    })?;
                let status = resp.status().as_u16();
                let skip = match status {
                    206 => 0,
                    200 => start, // no range support: skip to `start`
                    _ => {
                        return Err(FetchOverlayError::Status {
                            url: url.clone(),
                            status,
                        })
                    }
                };
                let stream = resp
                    .bytes_stream()
                    .map(|r| r.map_err(|e| crate::error_chain(&e)));
                Ok(ByteStream::new(
                    Box::pin(stream),
                    skip,
                    end.map(|e| e - start),
                ))
            }
            OverlaySource::File(path) => {
                let mut f =
                    tokio::fs::File::open(path)
                        .await
                        .map_err(|e| FetchOverlayError::Read {
                            offset: start,
                            detail: e.to_string(),
                        })?;
                f.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| {
                    FetchOverlayError::Read {
                        offset: start,
                        detail: e.to_string(),
                    }
                })?;
                let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match end {
                    Some(e) => Box::new(f.take(e - start)),
                    None => Box::new(f),
                };
                let stream = tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20)
                    .map(|r| r.map_err(|e| e.to_string()));
                Ok(ByteStream::new(Box::pin(stream), 0, end.map(|e| e - start)))
            }
        }
    }

    /// Fetch and check the header and manifest.
    pub async fn manifest(&self) -> Result<(Header, Manifest, u64), FetchOverlayError> {
        let mut first = self.range(0, Some(FIRST_FETCH)).await?;
        let mut buf = first.read_up_to(FIRST_FETCH).await?;
        if (buf.len() as u64) < HEADER_LEN as u64 {
            return Err(FetchOverlayError::Truncated {
                got: buf.len() as u64,
                expected: HEADER_LEN as u64,
            });
        }
        let header = Header::parse(&buf[..HEADER_LEN])?;
        let mrange = header.manifest_range();
        if (buf.len() as u64) < mrange.end {
            let mut rest = self.range(buf.len() as u64, Some(mrange.end)).await?;
            let more = rest.read_up_to(mrange.end - buf.len() as u64).await?;
            buf.extend_from_slice(&more);
        }
        if (buf.len() as u64) < mrange.end {
            return Err(FetchOverlayError::Truncated {
                got: buf.len() as u64,
                expected: mrange.end,
            });
        }
        let manifest = Manifest::parse(&header, &buf[mrange.start as usize..mrange.end as usize])?;
        Ok((header, manifest, mrange.end))
    }

    /// All segments, in file order, as one stream from `data_offset`.
    pub async fn segments(
        &self,
        data_offset: u64,
        file_len: u64,
    ) -> Result<ByteStream, FetchOverlayError> {
        self.range(data_offset, Some(file_len)).await
    }
}

type Inner = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// A byte stream with exact reads; `skip` bytes at its start are dropped.
pub struct ByteStream {
    inner: Inner,
    pending: Bytes,
    skip: u64,
    pos: u64,
    limit: Option<u64>,
}

impl ByteStream {
    fn new(inner: Inner, skip: u64, limit: Option<u64>) -> Self {
        Self {
            inner,
            pending: Bytes::new(),
            skip,
            pos: 0,
            limit,
        }
    }

    async fn fill(&mut self) -> Result<bool, FetchOverlayError> {
        while self.pending.is_empty() {
            match self.inner.next().await {
                None => return Ok(false),
                Some(Err(detail)) => {
                    return Err(FetchOverlayError::Read {
                        offset: self.pos,
                        detail,
                    })
                }
                Some(Ok(mut b)) => {
                    if self.skip > 0 {
                        let n = (self.skip as usize).min(b.len());
                        let _ = b.split_to(n);
                        self.skip -= n as u64;
                    }
                    self.pending = b;
                }
            }
        }
        Ok(true)
    }

    /// Read up to `n` bytes (fewer only at the end of the stream).
    pub async fn read_up_to(&mut self, n: u64) -> Result<Vec<u8>, FetchOverlayError> {
        let n = match self.limit {
            Some(l) => n.min(l.saturating_sub(self.pos)),
            None => n,
        };
        let mut out = Vec::with_capacity(n as usize);
        while (out.len() as u64) < n {
            if !self.fill().await? {
                break;
            }
            let take = ((n - out.len() as u64) as usize).min(self.pending.len());
            out.extend_from_slice(&self.pending.split_to(take));
        }
        self.pos += out.len() as u64;
        Ok(out)
    }

    /// Read exactly `n` bytes.
    pub async fn read_exact(&mut self, n: u64) -> Result<Vec<u8>, FetchOverlayError> {
        let start = self.pos;
        let out = self.read_up_to(n).await?;
        if (out.len() as u64) < n {
            return Err(FetchOverlayError::Truncated {
                got: start + out.len() as u64,
                expected: start + n,
            });
        }
        Ok(out)
    }
}
