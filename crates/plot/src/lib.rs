//! SVG plots of what cloudlet measures, written by hand (no plotting
//! dependency; a browser opens the files): [`LineChart`] for any series
//! over time, [`handoff`] for one handoff's course (what the CLI's
//! `--plot` and `handoff-bench` write), [`Timeline`] for stages side by
//! side (a synthesis' stages, `synth-bench`), [`stack`] to put charts one
//! above the other in one file.

pub mod chart;

use std::fmt::Write as _;

pub use chart::{LineChart, Mark, Scale, Series};
use cloudlet_api::events::HandoffRecord;

/// Charts one above the other, as one SVG document.
pub fn stack(charts: &[String]) -> String {
    let size = |svg: &str, attr: &str| -> f64 {
        let key = format!(" {attr}=\"");
        svg.find(&key)
            .and_then(|i| svg[i + key.len()..].split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let width = charts.iter().map(|c| size(c, "width")).fold(0.0, f64::max);
    let height: f64 = charts.iter().map(|c| size(c, "height")).sum();
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">\n"
    );
    let mut y = 0.0;
    for c in charts {
        // A nested <svg> placed at its offset (x/y on the inner element).
        let inner = c.replacen("<svg ", &format!("<svg x=\"0\" y=\"{y}\" "), 1);
        s.push_str(&inner);
        y += size(c, "height");
    }
    s.push_str("</svg>\n");
    s
}

/// One handoff's course: above, the bytes sent; below, the link's rate
/// and the guest's dirty rate (both Mbit/s, so that one sees whether the
/// link outruns the guest); the stages' starts and the switchover marked.
pub fn handoff(r: &HandoffRecord) -> String {
    let t = |ms: u64| ms as f64 / 1000.0;
    let title = format!(
        "{} to {}: {} in {:.2} s{}",
        r.name,
        r.destination,
        match r.outcome {
            cloudlet_api::events::HandoffOutcome::Moved => "moved",
            cloudlet_api::events::HandoffOutcome::Failed => "failed",
        },
        t(r.total_ms),
        r.downtime_ms
            .map(|d| format!(", downtime {d} ms"))
            .unwrap_or_default()
    );
    let mut bytes = LineChart::new(&title, "time since the handoff began (s)", "sent (MB)");
    bytes.height = 320;
    bytes.series(
        "bytes sent",
        r.samples
            .iter()
            .map(|s| (t(s.t_ms), s.bytes_sent as f64 / 1e6))
            .collect(),
    );
    let mut rates = LineChart::new("", "time since the handoff began (s)", "Mbit/s");
    rates.height = 320;
    rates.series(
        "link rate",
        r.samples
            .iter()
            .map(|s| (t(s.t_ms), s.rate_bps as f64 / 1e6))
            .collect(),
    );
    rates.series(
        "guest dirty rate",
        r.samples
            .iter()
            .map(|s| (t(s.t_ms), s.dirty_rate_bps as f64 * 8.0 / 1e6))
            .collect(),
    );
    let x_range = (0.0, t(r.total_ms).max(0.001));
    for c in [&mut bytes, &mut rates] {
        c.x_range = Some(x_range);
        let mut last = "";
        for s in &r.samples {
            if s.stage != last && s.stage != "switchover" {
                c.mark(t(s.t_ms), &s.stage);
            }
            last = &s.stage;
        }
        if let Some(sw) = r.switchover_ms {
            c.mark(t(sw), "switchover").color = "#d00000".into();
        }
    }
    stack(&[bytes.render(), rates.render()])
}

/// Rows of stages side by side in time: one row per run (a synthesis, a
/// handoff), each stage a bar from its start to its end.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub title: String,
    pub rows: Vec<(String, Vec<Span>)>,
}

/// One stage of a row, ms from the row's start.
#[derive(Debug, Clone)]
pub struct Span {
    pub stage: String,
    pub start_ms: f64,
    pub end_ms: f64,
}

impl Timeline {
    pub fn new(title: &str) -> Timeline {
        Timeline {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    /// A row whose stages follow each other (durations in ms, in order).
    pub fn sequence(&mut self, label: &str, stages: &[(String, f64)]) {
        let mut at = 0.0;
        let spans = stages
            .iter()
            .map(|(stage, ms)| {
                let s = Span {
                    stage: stage.clone(),
                    start_ms: at,
                    end_ms: at + ms,
                };
                at += ms;
                s
            })
            .collect();
        self.rows.push((label.into(), spans));
    }

    pub fn render(&self) -> String {
        const LEFT: f64 = 230.0;
        const RIGHT: f64 = 30.0;
        const ROW: f64 = 34.0;
        const TOP: f64 = 40.0;
        const BOTTOM: f64 = 70.0;
        let width = 1100.0;
        let height = TOP + ROW * self.rows.len() as f64 + BOTTOM;
        let end = self
            .rows
            .iter()
            .flat_map(|(_, s)| s.iter().map(|s| s.end_ms))
            .fold(1.0, f64::max);
        let px = |ms: f64| LEFT + ms / end * (width - LEFT - RIGHT);
        let mut stages: Vec<&str> = Vec::new();
        for (_, spans) in &self.rows {
            for s in spans {
                if !stages.contains(&s.stage.as_str()) {
                    stages.push(&s.stage);
                }
            }
        }
        let color = |stage: &str| {
            let i = stages.iter().position(|s| *s == stage).unwrap_or(0);
            chart::PALETTE[i % chart::PALETTE.len()]
        };
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{width}\" height=\"{height}\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
            width / 2.0,
            chart::esc(&self.title)
        );
        for (i, (label, spans)) in self.rows.iter().enumerate() {
            let y = TOP + ROW * i as f64;
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                LEFT - 8.0,
                y + ROW / 2.0 + 4.0,
                chart::esc(label)
            );
            for sp in spans {
                let (x0, x1) = (px(sp.start_ms), px(sp.end_ms));
                let _ = writeln!(
                    s,
                    "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {:.0} ms</title></rect>",
                    y + 4.0,
                    (x1 - x0).max(1.0),
                    ROW - 8.0,
                    color(&sp.stage),
                    chart::esc(&sp.stage),
                    sp.end_ms - sp.start_ms
                );
            }
        }
        // The time axis, in seconds.
        let axis_y = TOP + ROW * self.rows.len() as f64 + 4.0;
        for v in chart::linear_ticks(0.0, end / 1000.0) {
            let x = px(v * 1000.0);
            if x > width - RIGHT + 1.0 {
                continue;
            }
            let _ = writeln!(
                s,
                "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{axis_y}\" stroke=\"#e5e5e5\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                axis_y + 14.0,
                chart::fmt_num(v)
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"middle\">time (s)</text>",
            (LEFT + width - RIGHT) / 2.0,
            axis_y + 32.0
        );
        // The legend: each stage's color.
        let mut x = LEFT;
        for st in &stages {
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"14\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                axis_y + 44.0,
                color(st),
                x + 18.0,
                axis_y + 53.0,
                chart::esc(st)
            );
            x += 30.0 + 7.0 * st.len() as f64;
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudlet_api::events::{HandoffOutcome, HandoffSample, HANDOFF_HISTORY_VERSION};

    fn sample(t_ms: u64, stage: &str, bytes: u64) -> HandoffSample {
        HandoffSample {
            t_ms,
            stage: stage.into(),
            bytes_sent: bytes,
            rate_bps: bytes * 8,
            dirty_rate_bps: 1000,
            remaining_bytes: 0,
            iteration: 1,
        }
    }

    #[test]
    fn a_handoff_plot_has_both_charts_its_stages_and_the_switchover() {
        let r = HandoffRecord {
            version: HANDOFF_HISTORY_VERSION,
            handoff_id: "h".into(),
            vm_id: "v".into(),
            name: "kv<1>".into(),
            destination: "http://b".into(),
            started_unix_ms: 0,
            total_ms: 3000,
            outcome: HandoffOutcome::Moved,
            error: None,
            downtime_ms: Some(240),
            wire_bytes: 3_000_000,
            raw_bytes: 0,
            disk_bytes: 0,
            phases: vec![],
            switchover_ms: Some(2500),
            samples: vec![
                sample(0, "preparing", 0),
                sample(200, "disk", 0),
                sample(900, "memory", 1_000_000),
                sample(2500, "switchover", 2_500_000),
                sample(3000, "moved", 3_000_000),
            ],
            tenant: None,
        };
        let svg = handoff(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<svg").count(), 3, "two charts in one");
        assert!(svg.contains("downtime 240 ms") && svg.contains("kv&lt;1&gt;"));
        for label in [
            "disk",
            "memory",
            "switchover",
            "link rate",
            "guest dirty rate",
        ] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn a_timeline_lays_stages_end_to_end() {
        let mut t = Timeline::new("synthesis");
        t.sequence(
            "kvstore",
            &[("fetch".into(), 400.0), ("restore".into(), 600.0)],
        );
        t.sequence("translator", &[("fetch".into(), 1200.0)]);
        let svg = t.render();
        assert_eq!(
            svg.matches("<rect").count(),
            1 + 3 + 2,
            "background, bars, legend"
        );
        assert!(svg.contains("<title>restore 600 ms</title>"));
        assert!(!svg.contains("NaN"));
    }
}
