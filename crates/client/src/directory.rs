//! A client of the cloud tier's directory (`cloudlet directory serve`):
//! what a cloudlet calls to register and heartbeat, and what a device
//! calls to find its cloudlet.
//!
//! A fleet runs several directory instances over one etcd: the client is
//! given all their URLs, sticks to the one that answered last and tries
//! the next when one cannot be reached (or answers 5xx).
//!
//! [`DirectoryClient::discover`] is the device's choice: the directory
//! ranks the cloudlets that fit (network, distance, cache, room, load);
//! the device then measures its round trip to the top candidates, in
//! parallel, on kept-alive connections (`GET /v1/ping`, the median of a
//! few samples after one that opens the connection), and takes the
//! lowest. Candidates whose RTTs are within [`RTT_TIE`] of the lowest are
//! equally near: among those the directory's order stands (so a cached
//! overlay or an idle host wins over a 0.3 ms difference).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cloudlet_api::directory::{
    Candidate, DirectoryHealth, Lease, PeerList, Registration, SearchAnswer, SearchQuery,
};
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::http::{chain, Http};
use crate::ClientError;

/// RTTs within 10% plus 1 ms of the lowest count as equally near.
pub const RTT_TIE: (f64, Duration) = (0.10, Duration::from_millis(1));

/// A client of one directory, or of a fleet of its instances.
#[derive(Debug)]
pub struct DirectoryClient {
    endpoints: Vec<Http>,
    /// The instance that answered last.
    current: AtomicUsize,
}

/// How a device measures its candidates.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Candidates probed (the directory's top ones).
    pub candidates: usize,
    /// Timed samples per candidate (after one that opens the connection).
    pub samples: usize,
    /// A candidate that does not answer within this is left out.
    pub timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            candidates: 5,
            samples: 3,
            timeout: Duration::from_secs(2),
        }
    }
}

/// One candidate's measured round trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub name: String,
    pub api_url: String,
    /// The directory's rank.
    pub rank: usize,
    /// The median sample, ms (none: not reachable).
    pub rtt_ms: Option<f64>,
    pub samples_ms: Vec<f64>,
    pub error: Option<String>,
}

/// The cloudlet a device picked, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub candidate: Candidate,
    pub rtt_ms: f64,
    /// One line for a person.
    pub why: String,
}

/// A device's search: the directory's answer, the probes, the choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Discovery {
    /// The directory instance that answered.
    pub directory: String,
    pub answer: SearchAnswer,
    pub probes: Vec<Probe>,
    /// None when no candidate fits or none answered its probe.
    pub chosen: Option<Choice>,
}

impl Discovery {
    /// The choice for a person: what was chosen and why, what else was
    /// measured, and what the directory left out.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        match &self.chosen {
            Some(c) => s.push_str(&format!("chosen: {} ({})\n", c.candidate.name, c.why)),
            None if self.answer.candidates.is_empty() => {
                s.push_str("chosen: none (no registered cloudlet fits)\n")
            }
            None => s.push_str("chosen: none (no candidate answered its probe)\n"),
        }
        for c in &self.answer.candidates {
            let probe = self.probes.iter().find(|p| p.name == c.name);
            let rtt = match probe {
                Some(Probe {
                    rtt_ms: Some(r), ..
                }) => format!("rtt {r:.1} ms"),
                Some(Probe { error: Some(e), .. }) => format!("unreachable: {e}"),
                _ => "not probed".into(),
            };
            s.push_str(&format!(
                "  #{} {} {}: {}; {}\n",
                c.rank,
                c.name,
                c.api_url,
                rtt,
                c.reasons.join("; ")
            ));
        }
        for e in &self.answer.excluded {
            s.push_str(&format!("  left out: {} ({})\n", e.name, e.why));
        }
        s
    }
}

impl DirectoryClient {
    /// `urls`: the directory's instances (any order; the first is tried
    /// first). `token`: the cloudlet's credential, or a device's (none:
    /// anonymous search, where the directory allows it).
    pub fn new(urls: &[String], token: Option<String>) -> Self {
        let http = cloudlet_trust::tls::client_builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        DirectoryClient {
            endpoints: urls
                .iter()
                .map(|u| Http::new(u, token.clone(), http.clone()))
                .collect(),
            current: AtomicUsize::new(0),
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.base.clone()).collect()
    }

    /// Send to the instance that answered last, then to the others; an
    /// instance that cannot be reached or answers 5xx is skipped. The
    /// answer, and the URL of the instance that gave it.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Registration>,
        query: Option<&SearchQuery>,
    ) -> Result<(reqwest::Response, String), ClientError> {
        let n = self.endpoints.len();
        if n == 0 {
            return Err(ClientError::Connect {
                url: "(no directory)".into(),
                detail: "no directory URL given".into(),
            });
        }
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let k = (first + i) % n;
            let e = &self.endpoints[k];
            let mut r = e.request(method.clone(), path);
            if let Some(b) = body {
                r = r.json(b);
            }
            if let Some(q) = query {
                r = r.query(q);
            }
            match e.send(r).await {
                Ok(v) => {
                    self.current.store(k, Ordering::Relaxed);
                    return Ok((v, e.base.clone()));
                }
                Err(err) if retry_elsewhere(&err) => last = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last.expect("at least one endpoint was tried"))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: Option<&SearchQuery>,
    ) -> Result<(T, String), ClientError> {
        let (resp, url) = self.call(Method::GET, path, None, query).await?;
        Ok((decode(resp).await?, url))
    }

    /// Register or heartbeat (the same call): `PUT /v1/cloudlets/{name}`.
    pub async fn heartbeat(&self, reg: &Registration) -> Result<Lease, ClientError> {
        let path = format!("/v1/cloudlets/{}", reg.name);
        let (resp, _) = self.call(Method::PUT, &path, Some(reg), None).await?;
        decode(resp).await
    }

    /// Leave the directory now (on shutdown).
    pub async fn deregister(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/v1/cloudlets/{name}");
        self.call(Method::DELETE, &path, None, None).await?;
        Ok(())
    }

    /// The other live cloudlets, with their peer tokens (cloudlets only).
    pub async fn peers(&self, name: &str) -> Result<PeerList, ClientError> {
        Ok(self
            .get_json(&format!("/v1/cloudlets/{name}/peers"), None)
            .await?
            .0)
    }

    /// The directory's ranking of the cloudlets that fit the query.
    pub async fn search(&self, q: &SearchQuery) -> Result<SearchAnswer, ClientError> {
        Ok(self.get_json("/v1/cloudlets", Some(q)).await?.0)
    }

    /// One registered cloudlet, by name.
    pub async fn get(&self, name: &str) -> Result<Registration, ClientError> {
        Ok(self
            .get_json(&format!("/v1/cloudlets/{name}"), None)
            .await?
            .0)
    }

    pub async fn health(&self) -> Result<DirectoryHealth, ClientError> {
        Ok(self.get_json("/v1/health", None).await?.0)
    }

    /// A device's choice (see the module's documentation): search, probe
    /// the top candidates in parallel, pick the lowest RTT.
    pub async fn discover(
        &self,
        q: &SearchQuery,
        opts: &ProbeOptions,
    ) -> Result<Discovery, ClientError> {
        let (answer, directory): (SearchAnswer, String) =
            self.get_json("/v1/cloudlets", Some(q)).await?;
        let top: Vec<&Candidate> = answer.candidates.iter().take(opts.candidates).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for c in &top {
            let (name, url, rank) = (c.name.clone(), c.api_url.clone(), c.rank);
            let (samples, timeout) = (opts.samples.max(1), opts.timeout);
            tasks.spawn(async move {
                let got = probe_rtt(&url, samples, timeout).await;
                (name, url, rank, got)
            });
        }
        let mut probes = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let Ok((name, api_url, rank, got)) = done else {
                continue;
            };
            probes.push(match got {
                Ok(samples) => Probe {
                    name,
                    api_url,
                    rank,
                    rtt_ms: Some(ms(median(&samples))),
                    samples_ms: samples.iter().map(|d| ms(*d)).collect(),
                    error: None,
                },
                Err(e) => Probe {
                    name,
                    api_url,
                    rank,
                    rtt_ms: None,
                    samples_ms: vec![],
                    error: Some(e),
                },
            });
        }
        probes.sort_by_key(|p| p.rank);
        let chosen = choose(&probes).and_then(|(p, why)| {
            let candidate = answer.candidates.iter().find(|c| c.name == p.name)?;
            Some(Choice {
                candidate: candidate.clone(),
                rtt_ms: p.rtt_ms.unwrap_or_default(),
                why,
            })
        });
        Ok(Discovery {
            directory,
            answer,
            probes,
            chosen,
        })
    }
}

/// The lowest RTT, ties (within [`RTT_TIE`]) to the directory's rank; and
/// why, in one line.
pub fn choose(probes: &[Probe]) -> Option<(&Probe, String)> {
    let reachable: Vec<&Probe> = probes.iter().filter(|p| p.rtt_ms.is_some()).collect();
    let lowest = reachable
        .iter()
        .filter_map(|p| p.rtt_ms)
        .fold(f64::INFINITY, f64::min);
    let band = lowest * (1.0 + RTT_TIE.0) + ms(RTT_TIE.1);
    let best = reachable
        .iter()
        .filter(|p| p.rtt_ms.is_some_and(|r| r <= band))
        .min_by_key(|p| p.rank)?;
    let rtt = best.rtt_ms.unwrap_or_default();
    let others: Vec<String> = reachable
        .iter()
        .filter(|p| p.name != best.name)
        .map(|p| format!("{} {:.1} ms", p.name, p.rtt_ms.unwrap_or_default()))
        .collect();
    let unreachable = probes.len() - reachable.len();
    let mut why = if rtt <= lowest {
        format!("lowest RTT {rtt:.1} ms")
    } else {
        format!(
            "RTT {rtt:.1} ms, within {:.0}% + {} ms of the lowest ({lowest:.1} ms), and ranked higher by the directory",
            RTT_TIE.0 * 100.0,
            RTT_TIE.1.as_millis()
        )
    };
    why.push_str(&format!(", directory rank {}", best.rank));
    if !others.is_empty() {
        why.push_str(&format!("; others: {}", others.join(", ")));
    }
    if unreachable > 0 {
        why.push_str(&format!("; {unreachable} unreachable"));
    }
    Some((best, why))
}

/// Round trips to a daemon's `GET /v1/ping` on one kept-alive connection:
/// one request opens it (not counted), then `samples` timed ones. Any HTTP
/// answer counts (a daemon of an older release answers 404 as fast).
pub async fn probe_rtt(
    api_url: &str,
    samples: usize,
    timeout: Duration,
) -> Result<Vec<Duration>, String> {
    let http = cloudlet_trust::tls::client_builder()
        .connect_timeout(timeout)
        .timeout(timeout)
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| chain(&e))?;
    let url = format!("{}/v1/ping", api_url.trim_end_matches('/'));
    let once = || async {
        let t = Instant::now();
        let resp = http.get(&url).send().await.map_err(|e| chain(&e))?;
        // Read the body: the connection goes back to the pool only then.
        resp.bytes().await.map_err(|e| chain(&e))?;
        Ok::<Duration, String>(t.elapsed())
    };
    once().await?;
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        out.push(once().await?);
    }
    Ok(out)
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn decode<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
    resp.json()
        .await
        .map_err(|e| ClientError::Decode(chain(&e)))
}

/// Unreachable, or a server error: another instance may answer.
fn retry_elsewhere(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } => true,
        ClientError::Api { status, .. } => *status >= 500,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, rank: usize, rtt: Option<f64>) -> Probe {
        Probe {
            name: name.into(),
            api_url: format!("http://{name}"),
            rank,
            rtt_ms: rtt,
            samples_ms: vec![],
            error: rtt.is_none().then(|| "refused".into()),
        }
    }

    #[test]
    fn lowest_rtt_wins() {
        let probes = [
            p("a", 1, Some(40.0)),
            p("b", 2, Some(4.0)),
            p("c", 3, Some(20.0)),
        ];
        let (best, why) = choose(&probes).unwrap();
        assert_eq!(best.name, "b");
        assert!(why.starts_with("lowest RTT 4.0 ms"), "{why}");
    }

    #[test]
    fn a_tie_keeps_the_directory_order() {
        // 4.6 ms is within 10% + 1 ms of 4.0 ms: rank 1 stands.
        let probes = [p("a", 1, Some(4.6)), p("b", 2, Some(4.0))];
        let (best, why) = choose(&probes).unwrap();
        assert_eq!(best.name, "a");
        assert!(why.contains("ranked higher"), "{why}");
    }

    #[test]
    fn unreachable_candidates_are_not_chosen() {
        let probes = [p("a", 1, None), p("b", 2, Some(30.0))];
        let (best, why) = choose(&probes).unwrap();
        assert_eq!(best.name, "b");
        assert!(why.contains("1 unreachable"), "{why}");
        assert!(choose(&[p("a", 1, None)]).is_none());
        assert!(choose(&[]).is_none());
    }
}
