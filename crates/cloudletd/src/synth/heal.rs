//! A segment that arrives damaged is fetched again.
//!
//! A segment whose stored bytes do not have the length or the hash the
//! manifest names ([`ApplyOverlayError::may_heal_on_refetch`]) was refused
//! by the applier before it had any effect. An error in transit (a flipped
//! bit past TCP's checksum, a proxy that cut or mangled a response) heals
//! when the segment is fetched anew, so it is: up to [`SEGMENT_REFETCHES`]
//! times, each by a range request for exactly that segment. A segment that
//! stays bad is damaged where the overlay is stored: the synthesis ends at
//! once with the applier's error ("Segment N hash mismatch").
//!
//! A segment whose hash matched but that does not decode is not fetched
//! again: the hash covers the stored bytes, so a new fetch brings the same
//! bytes (the overlay was made damaged).

use std::ops::Range;

use cloudlet_overlay::{Applier, Manifest};

use crate::synth::fetch::OverlaySource;
use crate::synth::SynthesizeError;

/// How many times a damaged segment is fetched again before the synthesis
/// fails (so it is fetched at most `1 + SEGMENT_REFETCHES` times). An error
/// in transit rarely strikes the same segment twice; damage at rest strikes
/// every time, and each fetch of it costs a round trip and the segment's
/// bytes, so the bound is small.
pub const SEGMENT_REFETCHES: u32 = 2;

/// Applies segments, fetching a damaged one again (see the module doc).
/// Blocking: use it on an apply thread, inside a tokio runtime's blocking
/// pool (it waits for the new fetches on the runtime of its creation).
pub(crate) struct Healer {
    source: OverlaySource,
    /// Byte range of each segment in the overlay file.
    ranges: Vec<Range<u64>>,
    vm_id: String,
    rt: tokio::runtime::Handle,
}

impl Healer {
    /// A healer for `manifest`'s segments at `source`. Call from a tokio
    /// runtime.
    pub(crate) fn new(source: &OverlaySource, manifest: &Manifest, vm_id: &str) -> Healer {
        Healer {
            source: source.clone(),
            ranges: (0..manifest.segments.len() as u32)
                .map(|i| manifest.segment_range(i).unwrap_or(0..0))
                .collect(),
            vm_id: vm_id.to_string(),
            rt: tokio::runtime::Handle::current(),
        }
    }

    /// Applies `segment` (its stored `bytes` as they arrived); fetched again
    /// while it arrives damaged, at most [`SEGMENT_REFETCHES`] times.
    pub(crate) fn apply(
        &self,
        applier: &Applier,
        segment: u32,
        mut bytes: Vec<u8>,
    ) -> Result<(), SynthesizeError> {
        let vm_id = self.vm_id.as_str();
        let mut refetched = 0;
        loop {
            match applier.apply_segment(segment, &bytes) {
                Ok(()) => {
                    if refetched > 0 {
                        tracing::info!(vm_id, segment, refetched, "damaged segment healed");
                    }
                    return Ok(());
                }
                Err(e) if e.may_heal_on_refetch() && refetched < SEGMENT_REFETCHES => {
                    refetched += 1;
                    tracing::warn!(vm_id, segment, refetched, "{e}: fetching it again");
                    let range = self.ranges.get(segment as usize).cloned().unwrap_or(0..0);
                    bytes = self.rt.block_on(self.source.read_range(range))?;
                }
                Err(e) => {
                    if e.may_heal_on_refetch() {
                        tracing::error!(
                            vm_id,
                            segment,
                            fetches = refetched + 1,
                            "{e} on every fetch: the overlay is damaged at its source"
                        );
                    }
                    return Err(e.into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudlet_overlay::{create_overlay, ApplyConfig, ApplyOverlayError, CreateConfig};
    use rand::{Rng, SeedableRng};

    const CS: usize = 4096;

    /// A small overlay of new random memory pages in several segments.
    fn overlay(dir: &std::path::Path) -> (std::path::PathBuf, Manifest) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut base_disk = vec![0u8; 16 * CS];
        let mut base_mem = vec![0u8; 32 * CS];
        rng.fill(&mut base_disk[..]);
        rng.fill(&mut base_mem[..]);
        let mut launch_mem = base_mem.clone();
        rng.fill(&mut launch_mem[..]);
        for (name, data) in [
            ("base.disk", &base_disk),
            ("base.mem", &base_mem),
            ("launch.disk", &base_disk),
            ("launch.mem", &launch_mem),
        ] {
            std::fs::write(dir.join(name), data).unwrap();
        }
        let mut config = CreateConfig::new(
            dir.join("base.disk"),
            dir.join("base.mem"),
            dir.join("launch.disk"),
            dir.join("launch.mem"),
            vec![1, 2, 3],
            "base",
        );
        config.segment_size = 4 * CS as u32;
        let out = dir.join("overlay.clo");
        create_overlay(&config, &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let m = cloudlet_overlay::read_manifest(&mut &bytes[..]).unwrap().1;
        (out, m)
    }

    fn applier(dir: &std::path::Path, m: &Manifest) -> Applier {
        let config = ApplyConfig::new(
            dir.join("base.disk"),
            dir.join("base.mem"),
            dir.join("out.disk"),
            dir.join("out.mem"),
        );
        Applier::new(m.clone(), &config).unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_segment_damaged_on_the_way_heals_one_damaged_at_rest_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (file, m) = overlay(dir.path());
        assert!(m.segments.len() > 3, "{} segments", m.segments.len());
        let intact = std::fs::read(&file).unwrap();
        let seg = {
            let (intact, m) = (intact.clone(), m.clone());
            move |i: u32| {
                let r = m.segment_range(i).unwrap();
                intact[r.start as usize..r.end as usize].to_vec()
            }
        };
        let k = 2u32;
        let healer = Healer::new(&OverlaySource::File(file.clone()), &m, "t");

        // Damaged on the way (the file is intact): applied from a new fetch.
        let (dir2, m2, seg2) = (dir.path().to_path_buf(), m.clone(), seg.clone());
        let out = tokio::task::spawn_blocking(move || {
            let a = applier(&dir2, &m2);
            for i in 0..m2.segments.len() as u32 {
                let mut bytes = seg2(i);
                if i == k {
                    bytes[10] ^= 1;
                }
                healer.apply(&a, i, bytes).unwrap();
            }
            a.finish().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(out.device_state, vec![1, 2, 3]);

        // Damaged at rest: every fetch is bad, the applier's error comes back.
        let mut damaged = intact.clone();
        let r = m.segment_range(k).unwrap();
        damaged[r.start as usize + 5] ^= 0x80;
        std::fs::write(&file, &damaged).unwrap();
        let healer = Healer::new(&OverlaySource::File(file.clone()), &m, "t");
        let (dir2, m2) = (dir.path().to_path_buf(), m.clone());
        let bad = damaged[r.start as usize..r.end as usize].to_vec();
        let err = tokio::task::spawn_blocking(move || {
            let a = applier(&dir2, &m2);
            healer.apply(&a, k, bad).unwrap_err()
        })
        .await
        .unwrap();
        assert!(
            matches!(
                err,
                SynthesizeError::Apply(ApplyOverlayError::SegmentHashMismatch { segment }) if segment == k
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("Segment {k} hash mismatch")),
            "{err}"
        );

        // Gone at the source: the new fetch's error.
        std::fs::remove_file(&file).unwrap();
        let healer = Healer::new(&OverlaySource::File(file), &m, "t");
        let (dir2, m2) = (dir.path().to_path_buf(), m.clone());
        let err = tokio::task::spawn_blocking(move || {
            let a = applier(&dir2, &m2);
            let mut bytes = seg(k);
            bytes[0] ^= 1;
            healer.apply(&a, k, bytes).unwrap_err()
        })
        .await
        .unwrap();
        assert!(matches!(err, SynthesizeError::Fetch(_)), "{err}");
    }
}
