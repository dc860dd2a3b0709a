//! The source's client for the destination cloudlet: every HTTP call of a
//! handoff goes through a [`Peer`], and every answer comes back as a typed
//! value or a [`HandoffError`]. Nothing else in `handoff` speaks HTTP.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cloudlet_api::{
    ApiError, DifferingChunk, HandoffArrival, HandoffCommitted, HandoffLoaded, HandoffOffer,
    HandoffPrepared, MemoryDifference,
};
use cloudlet_handoff::memcheck::{self, DiffReport};
use futures::Stream;
use serde::de::DeserializeOwned;

use super::HandoffError;
use crate::retry::Backoff;

/// How long the source keeps asking for the answer to its commit when
/// none comes (the destination may be restarting): a definite answer may
/// only come later, and without one the VM is not resumed here.
pub const COMMIT_ANSWER_DEADLINE: Duration = Duration::from_secs(180);

/// The destination of one handoff.
#[derive(Debug, Clone)]
pub struct Peer {
    url: String,
    token: String,
    hid: String,
}

/// This cloudlet's certificate, shown to the destinations it calls
/// (mutual TLS; set at start when the API serves TLS).
static FLEET_IDENTITY: std::sync::OnceLock<reqwest::Identity> = std::sync::OnceLock::new();

/// Call peers as a member of the fleet of `tls`: trusting only its CA,
/// showing this cloudlet's certificate (once, at start, before any
/// handoff).
pub fn use_fleet_tls(tls: &cloudlet_trust::tls::TlsConfig) -> anyhow::Result<()> {
    cloudlet_trust::tls::trust_fleet_ca(&tls.ca)?;
    let id = reqwest::Identity::from_pem(&cloudlet_trust::tls::identity_pem(tls)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tls.cert.display()))?;
    let _ = FLEET_IDENTITY.set(id);
    Ok(())
}

/// A client for calls to destinations: no Nagle (small answers sit inside
/// a VM's downtime); `idle`: how long an idle connection is kept.
fn build_client(idle: Option<Duration>) -> reqwest::Client {
    let mut b = cloudlet_trust::tls::client_builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if let Some(id) = FLEET_IDENTITY.get() {
        b = b.identity(id.clone());
    }
    if let Some(idle) = idle {
        b = b.pool_idle_timeout(idle);
    }
    b.build().unwrap_or_default()
}

/// One client for all calls to destinations: the calls reuse connections
/// (a round trip less in the downtime).
fn http_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| build_client(None))
}

/// A client only for commits, whose connection is opened (and kept warm,
/// [`Peer::warm_commit_connection`]) before the downtime: a new connection
/// would cost a round trip there, its handshake queued behind the stream's
/// tail.
fn commit_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| build_client(Some(Duration::from_secs(600))))
}

impl Peer {
    pub fn new(url: &str, token: &str, hid: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            hid: hid.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The handoff's id.
    pub fn hid(&self) -> &str {
        &self.hid
    }

    /// `POST /v1/handoff/prepare`.
    pub async fn prepare(&self, offer: &HandoffOffer) -> Result<HandoffPrepared, HandoffError> {
        let resp = http_client()
            .post(format!("{}/v1/handoff/prepare", self.url))
            .bearer_auth(&self.token)
            .json(offer)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        self.answer(resp, "prepared handoff").await
    }

    /// `POST /v1/handoff/{id}/stream` with `body`: the destination's answer
    /// once it has loaded the VM.
    pub async fn stream<S>(&self, body: S) -> Result<HandoffLoaded, HandoffError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static,
    {
        let resp = http_client()
            .post(format!("{}/v1/handoff/{}/stream", self.url, self.hid))
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        self.answer(resp, "loaded handoff").await
    }

    /// A repair session (one body): the destination's answer once it has
    /// checked its memory again.
    pub async fn repair(&self, body: Vec<u8>) -> Result<HandoffLoaded, HandoffError> {
        let resp = http_client()
            .post(format!("{}/v1/handoff/{}/stream", self.url, self.hid))
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(body)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        self.answer(resp, "repaired handoff").await
    }

    /// Session bytes the destination has read so far (`None`: no answer).
    pub async fn received(&self) -> Option<u64> {
        let resp = http_client()
            .get(format!("{}/v1/handoff/{}", self.url, self.hid))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let a: HandoffArrival = resp.error_for_status().ok()?.json().await.ok()?;
        Some(a.received_bytes)
    }

    /// A cheap request on the commit client's connection.
    pub async fn warm_commit_connection(&self) {
        let _ = commit_client()
            .get(format!("{}/v1/handoff/{}", self.url, self.hid))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|r| r.bytes());
    }

    /// Send the commit until a definite answer: the destination's
    /// "committed" or a refusal from its API (a 4xx with its error body: it
    /// did not and will not resume the VM). No answer, a 5xx or a body that
    /// is not ours says nothing; after [`COMMIT_ANSWER_DEADLINE`] of those
    /// the outcome is [`HandoffError::CommitUnknown`], never a refusal.
    pub async fn commit(&self) -> Result<HandoffCommitted, HandoffError> {
        let deadline = Instant::now() + COMMIT_ANSWER_DEADLINE;
        let mut backoff = Backoff::new(
            Duration::from_millis(200),
            Duration::from_millis(3200),
            None,
        );
        loop {
            let unknown = match self.commit_once().await {
                Ok(done) => return Ok(done),
                Err(e) if definite_refusal(&e) => return Err(e),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(HandoffError::CommitUnknown {
                    url: self.url.clone(),
                    detail: unknown.to_string(),
                });
            }
            tracing::warn!(
                handoff = %self.hid,
                attempt = backoff.done,
                "no definite answer to the commit yet: {unknown}"
            );
            backoff.wait().await;
        }
    }

    async fn commit_once(&self) -> Result<HandoffCommitted, HandoffError> {
        let resp = commit_client()
            .post(format!("{}/v1/handoff/{}/commit", self.url, self.hid))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({}))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        match self.answer(resp, "commit").await {
            // A 2xx that is not a commit: not a definite answer.
            Err(HandoffError::BadAnswer { url, detail, .. }) => Err(HandoffError::CommitUnknown {
                url,
                detail: format!("an answer that is not a commit: {detail}"),
            }),
            r => r,
        }
    }

    /// Tell the destination to discard its copy, in the background (the
    /// link may be down; it also gives up on its own).
    pub fn abort_in_background(self) {
        tokio::spawn(async move {
            let mut backoff =
                Backoff::new(Duration::from_secs(1), Duration::from_secs(32), Some(6));
            loop {
                let sent = http_client()
                    .post(format!("{}/v1/handoff/{}/abort", self.url, self.hid))
                    .bearer_auth(&self.token)
                    .json(&serde_json::json!({}))
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await;
                match sent {
                    Ok(resp) if resp.status().is_success() || resp.status().is_client_error() => {
                        return
                    }
                    _ if backoff.wait().await => {}
                    _ => return,
                }
            }
        });
    }

    fn unreachable(&self, e: &reqwest::Error) -> HandoffError {
        HandoffError::Unreachable {
            url: self.url.clone(),
            detail: crate::error_chain(e),
        }
    }

    /// A 2xx with a `T`, or the destination's refusal, typed.
    async fn answer<T: DeserializeOwned>(
        &self,
        resp: reqwest::Response,
        what: &'static str,
    ) -> Result<T, HandoffError> {
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| self.unreachable(&e))?;
        if !(200..300).contains(&status) {
            return Err(self.refusal(status, &text));
        }
        serde_json::from_str(&text).map_err(|e| HandoffError::BadAnswer {
            url: self.url.clone(),
            what,
            detail: e.to_string(),
        })
    }

    fn refusal(&self, status: u16, text: &str) -> HandoffError {
        let Ok(body) = serde_json::from_str::<ApiError>(text) else {
            return HandoffError::Refused {
                url: self.url.clone(),
                status,
                kind: String::new(),
                message: text.to_string(),
            };
        };
        if let Some(report) = body.memory_differs.as_ref().and_then(diff_report) {
            if body.kind == "memory_differs" && (400..500).contains(&status) {
                return HandoffError::MemoryDiffers {
                    url: self.url.clone(),
                    report,
                };
            }
        }
        HandoffError::Refused {
            url: self.url.clone(),
            status,
            kind: body.kind,
            message: body.error,
        }
    }
}

/// A refusal from the destination's API itself (a 4xx with its error
/// body): its handler ran, or the call was refused before it could.
pub fn definite_refusal(e: &HandoffError) -> bool {
    match e {
        HandoffError::Refused { status, kind, .. } => {
            (400..500).contains(status) && !kind.is_empty()
        }
        HandoffError::MemoryDiffers { .. } => true,
        _ => false,
    }
}

/// The wire form of a memory difference report.
pub fn memory_difference(r: &DiffReport) -> MemoryDifference {
    MemoryDifference {
        chunks: r
            .chunks
            .iter()
            .map(|(chunk, pages)| DifferingChunk {
                chunk: *chunk,
                page_digests: pages.iter().map(|p| format!("{p:016x}")).collect(),
            })
            .collect(),
    }
}

/// A report from its wire form; `None` if it is malformed (more pages in a
/// chunk than a chunk has, a digest that is not 16 hex digits).
pub fn diff_report(d: &MemoryDifference) -> Option<DiffReport> {
    let mut chunks = Vec::with_capacity(d.chunks.len());
    for c in &d.chunks {
        if c.page_digests.len() > memcheck::CHUNK_PAGES {
            return None;
        }
        let pages = c
            .page_digests
            .iter()
            .map(|h| {
                (h.len() == 16)
                    .then(|| u64::from_str_radix(h, 16).ok())
                    .flatten()
            })
            .collect::<Option<Vec<u64>>>()?;
        chunks.push((c.chunk, pages));
    }
    Some(DiffReport { chunks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_difference_report_survives_its_wire_form() {
        let r = DiffReport {
            chunks: vec![(3, vec![1, u64::MAX, 0xdead_beef]), (700, vec![])],
        };
        let wire = memory_difference(&r);
        assert_eq!(wire.chunks[0].page_digests[1], "ffffffffffffffff");
        let json = serde_json::to_string(&wire).unwrap();
        let back: MemoryDifference = serde_json::from_str(&json).unwrap();
        assert_eq!(diff_report(&back), Some(r));
    }

    #[test]
    fn a_malformed_report_is_not_read() {
        let bad = |digest: &str| MemoryDifference {
            chunks: vec![DifferingChunk {
                chunk: 1,
                page_digests: vec![digest.into()],
            }],
        };
        for d in ["", "12", "zzzzzzzzzzzzzzzz", "00000000000000001"] {
            assert_eq!(diff_report(&bad(d)), None, "{d:?}");
        }
        let too_many = MemoryDifference {
            chunks: vec![DifferingChunk {
                chunk: 0,
                page_digests: vec!["0000000000000000".into(); memcheck::CHUNK_PAGES + 1],
            }],
        };
        assert_eq!(diff_report(&too_many), None);
    }

    #[test]
    fn only_an_api_refusal_is_definite() {
        let peer = Peer::new("http://x/", "t", "h");
        let api = |status, kind: &str| {
            peer.refusal(
                status,
                &serde_json::to_string(&ApiError {
                    error: "no".into(),
                    kind: kind.into(),
                    memory_differs: None,
                })
                .unwrap(),
            )
        };
        assert!(definite_refusal(&api(409, "stale_generation")));
        assert!(!definite_refusal(&api(503, "over_capacity")));
        // A proxy's 404 page is not the destination's API speaking.
        assert!(!definite_refusal(
            &peer.refusal(404, "<html>not found</html>")
        ));
        let differs = peer.refusal(
            409,
            &serde_json::to_string(&ApiError {
                error: "differs".into(),
                kind: "memory_differs".into(),
                memory_differs: Some(memory_difference(&DiffReport {
                    chunks: vec![(2, vec![7])],
                })),
            })
            .unwrap(),
        );
        assert!(
            matches!(&differs, HandoffError::MemoryDiffers { report, .. } if report.chunks == vec![(2, vec![7])])
        );
        assert!(definite_refusal(&differs));
    }
}
