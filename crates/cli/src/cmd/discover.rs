//! `cloudlet discover` and `cloudlet synthesize --directory`: the device
//! finds its cloudlet through the directory (its ranking, then the RTT the
//! device measures to the top candidates: `cloudlet_client::directory`).

use std::io::Read;

use clap::Args;
use cloudlet_api::directory::SearchQuery;
use cloudlet_client::directory::{DirectoryClient, Discovery, ProbeOptions};
use cloudlet_overlay::format::{Header, HEADER_LEN};

use crate::Output;

/// How a device asks the directory.
#[derive(Args, Clone, Default)]
pub struct FindArgs {
    /// The directory (its instances' URLs, comma-separated).
    #[arg(long, env = "CLOUDLET_DIRECTORY", value_delimiter = ',')]
    pub directory: Vec<String>,
    /// A file (mode 0600) holding the device's credential at the
    /// directory (default: $CLOUDLET_DEVICE_TOKEN, else anonymous, where
    /// the directory allows it).
    #[arg(long)]
    pub device_token_file: Option<std::path::PathBuf>,
    /// Where the device is, `LAT,LON` (ranks by geographic distance).
    #[arg(long, value_parser = parse_near, allow_hyphen_values = true)]
    pub near: Option<(f64, f64)>,
    /// How many of the top candidates to probe (RTT).
    #[arg(long, default_value_t = 5)]
    pub probe: usize,
}

#[derive(Args)]
pub struct DiscoverArgs {
    #[command(flatten)]
    pub find: FindArgs,
    /// Only cloudlets that hold this base VM (name or id).
    #[arg(long)]
    pub base: Option<String>,
    /// Prefer cloudlets that cached this overlay (URL).
    #[arg(long)]
    pub overlay: Option<String>,
    /// Only cloudlets with room for this flavor.
    #[arg(long)]
    pub flavor: Option<String>,
    /// How many candidates the directory answers.
    #[arg(long, default_value_t = 5)]
    pub n: usize,
}

impl FindArgs {
    /// The device's credential: `--device-token-file`, else
    /// `$CLOUDLET_DEVICE_TOKEN`, else none.
    pub fn device_token(&self) -> anyhow::Result<Option<String>> {
        Ok(cloudlet_trust::secrets::credential_from(
            self.device_token_file.as_deref(),
            "CLOUDLET_DEVICE_TOKEN",
        )?)
    }
}

fn parse_near(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: expected LAT,LON"))?;
    let lat: f64 = a.trim().parse().map_err(|_| format!("latitude {a:?}"))?;
    let lon: f64 = b.trim().parse().map_err(|_| format!("longitude {b:?}"))?;
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return Err(format!("{s:?}: latitude -90..90, longitude -180..180"));
    }
    Ok((lat, lon))
}

/// Search and probe; the choice with its reasons.
pub async fn find(
    f: &FindArgs,
    base: Option<String>,
    overlay: Option<String>,
    flavor: Option<String>,
    n: usize,
) -> anyhow::Result<Discovery> {
    if f.directory.is_empty() {
        anyhow::bail!("no directory: give --directory URL (or set CLOUDLET_DIRECTORY)");
    }
    let client = DirectoryClient::new(&f.directory, f.device_token()?);
    let q = SearchQuery {
        lat: f.near.map(|n| n.0),
        lon: f.near.map(|n| n.1),
        base,
        overlay,
        flavor,
        n: Some(n.max(1)),
        addr: None,
    };
    let opts = ProbeOptions {
        candidates: f.probe.max(1),
        ..ProbeOptions::default()
    };
    Ok(client.discover(&q, &opts).await?)
}

pub async fn discover(args: DiscoverArgs, output: Output) -> anyhow::Result<()> {
    let d = find(&args.find, args.base, args.overlay, args.flavor, args.n).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
        Output::Text => print!("{}", d.explain()),
    }
    if d.chosen.is_none() {
        anyhow::bail!("no cloudlet fits");
    }
    Ok(())
}

/// The base VM id an overlay names (a URL: its header and manifest, by
/// range requests; a file: its first bytes).
pub async fn overlay_base_id(overlay: &str) -> anyhow::Result<String> {
    let prefix = if overlay.starts_with("http://") || overlay.starts_with("https://") {
        let http = cloudlet_trust::tls::client_builder().build()?;
        let get = |end: usize| {
            let http = http.clone();
            async move {
                let resp = http
                    .get(overlay)
                    .header("range", format!("bytes=0-{}", end - 1))
                    .send()
                    .await?
                    .error_for_status()?;
                anyhow::Ok(resp.bytes().await?.to_vec())
            }
        };
        let head = get(HEADER_LEN).await?;
        let header = Header::parse(head.get(..HEADER_LEN).unwrap_or(&head))?;
        get(header.manifest_range().end as usize).await?
    } else {
        let mut f = std::fs::File::open(overlay)
            .map_err(|e| anyhow::anyhow!("Cannot read the overlay {overlay}: {e}"))?;
        let mut head = vec![0; HEADER_LEN];
        f.read_exact(&mut head)?;
        let header = Header::parse(&head)?;
        let mut rest = vec![0; header.manifest_range().end as usize - HEADER_LEN];
        f.read_exact(&mut rest)?;
        head.extend_from_slice(&rest);
        head
    };
    // The daemon's own check before it fetches segments (the length is its
    // to check).
    let v = cloudlet_overlay::Validation::structure().check_prefix(&prefix, None)?;
    Ok(v.manifest.base_id)
}

#[cfg(test)]
mod tests {
    use super::parse_near;

    #[test]
    fn near_takes_latitude_then_longitude() {
        assert_eq!(parse_near("40.44,-79.94"), Ok((40.44, -79.94)));
        assert!(parse_near("40.44").is_err());
        assert!(parse_near("91,0").unwrap_err().contains("latitude -90..90"));
        assert!(parse_near("a,b").is_err());
    }
}
