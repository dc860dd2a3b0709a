//! What a check finds (an [`Offender`]) and how it is printed: one table per
//! check, then the baseline lines that are fixed, then a one-line summary.

use std::fmt;
use std::fmt::Write as _;

/// The four checks, in the order they are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    File,
    Fn,
    Qmp,
    Cycle,
}

impl Check {
    pub const ALL: [Check; 4] = [Check::File, Check::Fn, Check::Qmp, Check::Cycle];

    /// The first word of the check's baseline lines.
    pub fn word(self) -> &'static str {
        match self {
            Check::File => "file",
            Check::Fn => "fn",
            Check::Qmp => "qmp",
            Check::Cycle => "cycle",
        }
    }

    pub fn from_word(word: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.word() == word)
    }

    /// What the check holds, as the title of its table.
    fn title(self) -> &'static str {
        match self {
            Check::File => "Files over 1,000 lines (crates/cloudletd/src, crates/qemu/src)",
            Check::Fn => "Functions over 150 lines (crates/cloudletd/src, crates/qemu/src)",
            Check::Qmp => "Raw QMP command strings outside crates/qemu",
            Check::Cycle => "Import cycles between modules (crates/cloudletd, crates/qemu)",
        }
    }

    /// The unit of `measured` and `limit` in the table.
    fn unit(self) -> &'static str {
        match self {
            Check::File | Check::Fn => "lines",
            Check::Qmp => "calls",
            Check::Cycle => "modules",
        }
    }

    /// Whether a baseline line of this check carries the measured number
    /// (a cycle's key already names all its modules).
    pub fn has_measure(self) -> bool {
        self != Check::Cycle
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// One thing over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offender {
    pub check: Check,
    /// What it is, as the baseline names it: a file's path; `path fn_name`;
    /// `path qmp-command`; `crate a<->b`.
    pub key: String,
    /// Lines of the file or function, raw calls of the command in the
    /// file, modules in the cycle.
    pub measured: usize,
    /// The most that is allowed (over it is an offence).
    pub limit: usize,
    /// Where, for a person: `file:line`s, or the references of a cycle.
    pub at: Vec<String>,
}

/// How an offender compares with the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not in the baseline (or there is no baseline): fails the check.
    New,
    /// In the baseline with a smaller number: fails the check.
    Grew { was: usize },
    /// In the baseline, no bigger than there.
    Known,
}

impl Status {
    pub fn fails(self) -> bool {
        !matches!(self, Status::Known)
    }

    fn label(self) -> String {
        match self {
            Status::New => "NEW".to_string(),
            Status::Grew { was } => format!("GREW (was {was})"),
            Status::Known => "known".to_string(),
        }
    }
}

/// The tables of all checks, the fixed baseline lines and the summary line.
pub fn render(
    found: &[(Offender, Status)],
    fixed: &[String],
    baseline_lines: Option<usize>,
) -> String {
    let mut out = String::new();
    for check in Check::ALL {
        let rows: Vec<&(Offender, Status)> =
            found.iter().filter(|(o, _)| o.check == check).collect();
        render_table(&mut out, check, &rows);
        out.push('\n');
    }
    if !fixed.is_empty() {
        out.push_str(
            "Fixed: these baseline lines can be removed (or lowered to the number shown):\n",
        );
        for line in fixed {
            let _ = writeln!(out, "  {line}");
        }
        out.push('\n');
    }
    out.push_str(&summary(found, fixed, baseline_lines));
    out.push('\n');
    out
}

fn render_table(out: &mut String, check: Check, rows: &[&(Offender, Status)]) {
    let _ = writeln!(out, "{} ({}):", check.title(), rows.len());
    if rows.is_empty() {
        out.push_str("  none\n");
        return;
    }
    let header = ["status", "what", "where", "measured", "limit"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|(o, s)| {
            let (what, place) = what_and_where(o);
            [
                s.label(),
                what,
                place,
                format!("{} {}", o.measured, check.unit()),
                o.limit.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::from(" ");
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // Numbers right-aligned, text left-aligned.
            if i >= 3 {
                let _ = write!(s, " {cell:>w$}");
            } else {
                let _ = write!(s, " {cell:<w$}");
            }
        }
        s.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(&header));
    for ((o, _), row) in rows.iter().zip(&cells) {
        let _ = writeln!(out, "{}", line(&row.each_ref().map(String::as_str)));
        if check == Check::Cycle {
            for reference in &o.at {
                let _ = writeln!(out, "      {reference}");
            }
        }
    }
}

/// The "what" and "where" columns of an offender's row.
fn what_and_where(o: &Offender) -> (String, String) {
    let mut words = o.key.splitn(2, ' ');
    let first = words.next().unwrap_or_default().to_string();
    let rest = words.next().unwrap_or_default().to_string();
    match o.check {
        Check::File => ("file".to_string(), first),
        Check::Fn | Check::Qmp => (rest, o.at.join(", ")),
        Check::Cycle => (rest, format!("crates/{first}")),
    }
}

fn summary(
    found: &[(Offender, Status)],
    fixed: &[String],
    baseline_lines: Option<usize>,
) -> String {
    let count = |c: Check| found.iter().filter(|(o, _)| o.check == c).count();
    let new = found.iter().filter(|(_, s)| *s == Status::New).count();
    let grew = found
        .iter()
        .filter(|(_, s)| matches!(s, Status::Grew { .. }))
        .count();
    let verdict = if new + grew > 0 { "FAIL" } else { "ok" };
    let mut s = format!(
        "check-layout: {verdict}: {} long files, {} long functions, {} raw QMP commands, {} import cycles",
        count(Check::File),
        count(Check::Fn),
        count(Check::Qmp),
        count(Check::Cycle),
    );
    match baseline_lines {
        Some(n) => {
            let _ = write!(
                s,
                "; against a baseline of {n}: {new} new, {grew} grew, {} fixed",
                fixed.len()
            );
        }
        None => {
            let _ = write!(s, "; no baseline: {new} fail");
        }
    }
    s
}
