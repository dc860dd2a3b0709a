//! Line charts as SVG text, written by hand (no plotting dependency): a
//! benchmark builds a [`LineChart`], adds series and marks, and writes
//! [`LineChart::render`] to a file a browser opens.
//!
//! ```
//! use cloudlet_plot::{LineChart, Scale};
//! let mut c = LineChart::new("RTT over time", "time (s)", "RTT (ms)");
//! c.y_scale = Scale::Log;
//! c.series("ours", vec![(0.0, 4.0), (1.0, 5.0), (2.0, 4.5)]);
//! c.mark(1.5, "move");
//! assert!(c.render().starts_with("<svg"));
//! ```

use std::fmt::Write as _;

/// How values map to the y axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Base 10; values at or below zero are left out.
    Log,
}

/// One line: its name in the legend and its points `(x, y)`, in x order
/// (see [`LineChart::gap`]).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: String,
    pub dashed: bool,
}

/// A vertical line at `x` with a short label (an event: a move, a step).
#[derive(Debug, Clone)]
pub struct Mark {
    pub x: f64,
    pub label: String,
    pub color: String,
}

/// A line chart: axes with ticks and labels, series, vertical marks and a
/// legend.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub y_scale: Scale,
    pub width: u32,
    pub height: u32,
    /// Break a line where consecutive points are further apart in x.
    pub gap: Option<f64>,
    /// The x axis's range (default: that of the points and marks).
    pub x_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
    pub marks: Vec<Mark>,
}

/// Colors given to series in turn (colorblind-safe, Okabe-Ito).
pub(crate) const PALETTE: [&str; 7] = [
    "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000",
];

const LEFT: f64 = 70.0;
/// Room for the legend, right of the plot.
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;

impl LineChart {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        LineChart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            y_scale: Scale::Linear,
            width: 1100,
            height: 480,
            gap: None,
            x_range: None,
            series: Vec::new(),
            marks: Vec::new(),
        }
    }

    /// Add a solid line in the next palette color; the series, to adjust.
    pub fn series(&mut self, name: &str, points: Vec<(f64, f64)>) -> &mut Series {
        let color = PALETTE[self.series.len() % PALETTE.len()].to_string();
        self.series.push(Series {
            name: name.into(),
            points,
            color,
            dashed: false,
        });
        self.series.last_mut().expect("just pushed")
    }

    /// Add a vertical mark (grey).
    pub fn mark(&mut self, x: f64, label: &str) -> &mut Mark {
        self.marks.push(Mark {
            x,
            label: label.into(),
            color: "#777777".into(),
        });
        self.marks.last_mut().expect("just pushed")
    }

    fn y_value(&self, y: f64) -> Option<f64> {
        match self.y_scale {
            Scale::Linear => y.is_finite().then_some(y),
            Scale::Log => (y > 0.0 && y.is_finite()).then(|| y.log10()),
        }
    }

    /// The whole chart as an SVG document.
    pub fn render(&self) -> String {
        let (w, h) = (f64::from(self.width), f64::from(self.height));
        let (pw, ph) = (w - LEFT - RIGHT, h - TOP - BOTTOM);
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .chain(self.marks.iter().map(|m| m.x));
        let (x0, x1) = self.x_range.or(bounds(xs)).unwrap_or((0.0, 1.0));
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter_map(|p| self.y_value(p.1)));
        let (mut y0, mut y1) = bounds(ys).unwrap_or((0.0, 1.0));
        let (x_ticks, y_ticks);
        match self.y_scale {
            Scale::Linear => {
                y0 = y0.min(0.0);
                let t = linear_ticks(y0, y1);
                y1 = t.last().copied().unwrap_or(y1).max(y1);
                y_ticks = t.into_iter().map(|v| (v, fmt_num(v))).collect::<Vec<_>>();
            }
            Scale::Log => {
                y0 = y0.floor();
                y1 = y1.ceil().max(y0 + 1.0);
                y_ticks = log_ticks(y0, y1);
            }
        }
        x_ticks = linear_ticks(x0, x1)
            .into_iter()
            .filter(|v| *v >= x0 - 1e-9 && *v <= x1 + 1e-9)
            .map(|v| (v, fmt_num(v)))
            .collect::<Vec<_>>();
        let px = |x: f64| LEFT + (x - x0) / (x1 - x0).max(f64::MIN_POSITIVE) * pw;
        let py = |y: f64| TOP + ph - (y - y0) / (y1 - y0).max(f64::MIN_POSITIVE) * ph;

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            w / 2.0,
            esc(&self.title)
        );
        // Grid, ticks and their labels.
        for (v, label) in &y_ticks {
            let y = py(*v);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                esc(label)
            );
        }
        for (v, label) in &x_ticks {
            let x = px(*v);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 16.0,
                esc(label)
            );
        }
        let _ = writeln!(
            s,
            r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            h - 14.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        // Marks under the lines; a label goes left of its line near the
        // right edge, and one row down when it would overlap the last.
        let mut row_ends = [f64::NEG_INFINITY; 3];
        let mut marks: Vec<&Mark> = self.marks.iter().collect();
        marks.sort_by(|a, b| a.x.total_cmp(&b.x));
        for m in marks {
            let x = px(m.x);
            let width = 6.5 * m.label.chars().count() as f64;
            let (lx, anchor) = if x + 3.0 + width > LEFT + pw {
                (x - 3.0, "end")
            } else {
                (x + 3.0, "start")
            };
            let start = if anchor == "end" { lx - width } else { lx };
            let row = row_ends.iter().position(|e| *e < start).unwrap_or(0);
            row_ends[row] = start + width;
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="{}" stroke-dasharray="4 3"/><text x="{lx:.1}" y="{:.1}" fill="{}" font-size="11" text-anchor="{anchor}">{}</text>"#,
                TOP + ph,
                m.color,
                TOP + 12.0 + 13.0 * row as f64,
                m.color,
                esc(&m.label)
            );
        }
        for series in &self.series {
            for run in self.runs(series) {
                if let [(x, y)] = run[..] {
                    // A lone point: a dot (a polyline of one point shows nothing).
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="2" fill="{}"/>"#,
                        px(x),
                        py(y),
                        series.color
                    );
                    continue;
                }
                let d = run
                    .iter()
                    .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                    .collect::<Vec<_>>()
                    .join(" ");
                let dash = if series.dashed {
                    r#" stroke-dasharray="6 4""#
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{}" stroke-width="1.5"{dash} points="{d}"/>"#,
                    series.color
                );
            }
        }
        // The legend, right of the plot.
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            s,
            r##"<rect x="{lx:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="white" stroke="#999999"/>"##,
            TOP,
            RIGHT - 20.0,
            8.0 + 18.0 * self.series.len() as f64,
        );
        for (i, series) in self.series.iter().enumerate() {
            let y = TOP + 14.0 + 18.0 * i as f64;
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 8.0,
                lx + 36.0,
                series.color,
                lx + 42.0,
                y + 4.0,
                esc(&series.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// The drawable points of `series` (y mapped to the scale), split at
    /// gaps and at values the scale cannot show.
    fn runs(&self, series: &Series) -> Vec<Vec<(f64, f64)>> {
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        let mut last_x: Option<f64> = None;
        for &(x, y) in &series.points {
            let broken = matches!((last_x, self.gap), (Some(l), Some(g)) if x - l > g);
            match self.y_value(y) {
                Some(v) if x.is_finite() => {
                    if broken {
                        runs.push(Vec::new());
                    }
                    runs.last_mut().expect("one run").push((x, v));
                }
                _ => runs.push(Vec::new()),
            }
            last_x = Some(x);
        }
        runs.retain(|r| !r.is_empty());
        runs
    }
}

/// The smallest and largest finite value.
fn bounds(v: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = v
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    if lo > hi {
        return None;
    }
    if lo == hi {
        return Some((lo - 0.5, hi + 0.5));
    }
    Some((lo, hi))
}

/// About six round ticks (1, 2 or 5 times a power of ten apart) covering
/// `[lo, hi]`.
pub(crate) fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    let mut t = Vec::new();
    let mut v = first;
    while v < hi + step * 0.999 && t.len() < 100 {
        t.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    t
}

/// Ticks at 1, 2 and 5 times each power of ten between the exponents
/// `lo` and `hi` (in log10 units), labelled with the value.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let mut t = Vec::new();
    let mut e = lo;
    while e <= hi + 1e-9 {
        for m in [1.0f64, 2.0, 5.0] {
            let v = m.log10() + e;
            if v <= hi + 1e-9 {
                t.push((v, fmt_num(m * 10f64.powi(e.round() as i32))));
            }
        }
        e += 1.0;
    }
    t
}

pub(crate) fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 * v.abs().max(1.0) && v.abs() < 1e9 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{}", (v * 1000.0).round() / 1000.0)
    }
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_ticks_are_round_and_cover_the_range() {
        let t = linear_ticks(0.0, 183.0);
        assert_eq!(t.first(), Some(&0.0));
        assert!(*t.last().unwrap() >= 183.0, "{t:?}");
        assert!(
            t.windows(2).all(|w| (w[1] - w[0] - 50.0).abs() < 1e-9),
            "{t:?}"
        );
    }

    #[test]
    fn log_ticks_name_the_values() {
        let t = log_ticks(0.0, 2.0);
        let labels: Vec<_> = t.iter().map(|x| x.1.as_str()).collect();
        assert_eq!(labels, ["1", "2", "5", "10", "20", "50", "100"]);
    }

    #[test]
    fn a_chart_has_its_lines_legend_and_marks() {
        let mut c = LineChart::new("t <1>", "x", "y");
        c.y_scale = Scale::Log;
        c.gap = Some(1.5);
        // A gap after x = 1 and a value the log scale drops.
        c.series(
            "a",
            vec![(0.0, 1.0), (1.0, 2.0), (5.0, 3.0), (6.0, 0.0), (7.0, 4.0)],
        );
        c.series("b & c", vec![(0.0, 10.0), (1.0, 20.0)]).dashed = true;
        c.mark(3.0, "move");
        let svg = c.render();
        // a: a line, then two lone points (dots); b: a line.
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 2, "{svg}");
        assert!(svg.contains("t &lt;1&gt;") && svg.contains("b &amp; c"));
        assert!(svg.contains(">move</text>"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn an_empty_chart_still_renders() {
        let svg = LineChart::new("empty", "x", "y").render();
        assert!(svg.contains("</svg>") && !svg.contains("NaN"), "{svg}");
    }
}
