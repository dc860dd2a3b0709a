//! The ratchet: offenders that are known today and may stay until fixed.
//!
//! A baseline file has one offender a line, as `--write-baseline` writes it:
//!
//! ```text
//! file crates/cloudletd/src/handoff.rs 2612
//! fn crates/cloudletd/src/handoff.rs send_vm 737
//! qmp crates/cloudletd/src/handoff.rs query-migrate 4
//! cycle cloudletd cloudlet<->handoff
//! ```
//!
//! (a number is the lines of the file or function, or the raw calls of the
//! QMP command in that file; a `qmp` line without one allows any count).
//! Blank lines and lines starting with `#` are ignored. Against a baseline
//! the check fails only on an offender that is not in it, or one that grew
//! past its number; baseline lines that no longer match anything (or whose
//! offender shrank) are printed so that they can be removed or lowered.

use std::collections::BTreeMap;

use anyhow::{bail, Context};

use crate::report::{Check, Offender, Status};

/// Known offenders: (check, key) -> the number allowed (None: any).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Baseline {
    entries: BTreeMap<(Check, String), Option<usize>>,
}

impl Baseline {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn parse(text: &str) -> anyhow::Result<Baseline> {
        let mut entries = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (check, key, allowed) =
                parse_line(line).with_context(|| format!("Baseline line {}: {line:?}", i + 1))?;
            entries.insert((check, key), allowed);
        }
        Ok(Baseline { entries })
    }

    /// The baseline that allows exactly what was found (for
    /// `--write-baseline`): one line per offender, the largest number where
    /// two share a key.
    pub fn of(found: &[Offender]) -> Baseline {
        let mut entries: BTreeMap<(Check, String), Option<usize>> = BTreeMap::new();
        for o in found {
            let allowed = o.check.has_measure().then_some(o.measured);
            let entry = entries.entry((o.check, o.key.clone())).or_insert(allowed);
            *entry = (*entry).max(allowed);
        }
        Baseline { entries }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::from(
            "# Known layout offenders (check-layout --write-baseline). The check fails\n\
             # on any offender not listed here, or one that grew past its number.\n\
             # Remove a line when it is fixed; never raise a number.\n",
        );
        for ((check, key), allowed) in &self.entries {
            match allowed {
                Some(n) => s.push_str(&format!("{check} {key} {n}\n")),
                None => s.push_str(&format!("{check} {key}\n")),
            }
        }
        s
    }

    /// Each offender with its status, and the baseline lines that can go
    /// (fixed) or be lowered (shown with the number found now).
    pub fn compare(&self, found: &[Offender]) -> (Vec<(Offender, Status)>, Vec<String>) {
        let statuses = found
            .iter()
            .map(|o| {
                let status = match self.entries.get(&(o.check, o.key.clone())) {
                    None => Status::New,
                    Some(Some(was)) if o.measured > *was => Status::Grew { was: *was },
                    Some(_) => Status::Known,
                };
                (o.clone(), status)
            })
            .collect();
        let now = Baseline::of(found);
        let mut fixed = Vec::new();
        for ((check, key), allowed) in &self.entries {
            match (now.entries.get(&(*check, key.clone())), allowed) {
                (None, _) => fixed.push(line(*check, key, *allowed)),
                (Some(Some(n)), Some(was)) if n < was => {
                    fixed.push(format!("{} (now {n})", line(*check, key, *allowed)));
                }
                _ => {}
            }
        }
        (statuses, fixed)
    }
}

fn line(check: Check, key: &str, allowed: Option<usize>) -> String {
    match allowed {
        Some(n) => format!("{check} {key} {n}"),
        None => format!("{check} {key}"),
    }
}

fn parse_line(line: &str) -> anyhow::Result<(Check, String, Option<usize>)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some(check) = words.first().and_then(|w| Check::from_word(w)) else {
        bail!("Starts with none of file, fn, qmp, cycle");
    };
    // Key words: file: path; fn: path name; qmp: path command; cycle: crate modules.
    let key_words = if check == Check::File { 1 } else { 2 };
    if words.len() < 1 + key_words || words.len() > 2 + key_words {
        bail!("Expected {} words after {check:?}", key_words + 1);
    }
    let key = words[1..=key_words].join(" ");
    let allowed = match words.get(1 + key_words) {
        Some(_) if check == Check::Cycle => bail!("A cycle line has no number"),
        Some(n) => Some(
            n.parse()
                .with_context(|| format!("{n:?} is not a number"))?,
        ),
        None if check == Check::Qmp => None,
        None if check == Check::Cycle => None,
        None => bail!("No number at the end"),
    };
    Ok((check, key, allowed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offender(check: Check, key: &str, measured: usize) -> Offender {
        Offender {
            check,
            key: key.to_string(),
            measured,
            limit: 0,
            at: Vec::new(),
        }
    }

    const BASELINE: &str = "\
# comment
file crates/cloudletd/src/handoff.rs 2612
fn crates/cloudletd/src/handoff.rs send_vm 737
fn crates/cloudletd/src/handoff.rs gone 200
qmp crates/cloudletd/src/handoff.rs query-migrate 4
qmp crates/cloudletd/src/throttle.rs cont
cycle cloudletd cloudlet<->handoff
";

    #[test]
    fn fails_only_on_new_or_grown_offenders_and_lists_fixed_lines() {
        let baseline = Baseline::parse(BASELINE).unwrap();
        assert_eq!(baseline.len(), 6);
        let found = vec![
            offender(Check::File, "crates/cloudletd/src/handoff.rs", 2000),
            offender(Check::Fn, "crates/cloudletd/src/handoff.rs send_vm", 738),
            offender(Check::Fn, "crates/cloudletd/src/http.rs router", 151),
            offender(
                Check::Qmp,
                "crates/cloudletd/src/handoff.rs query-migrate",
                4,
            ),
            offender(Check::Qmp, "crates/cloudletd/src/throttle.rs cont", 9),
            offender(Check::Cycle, "cloudletd cloudlet<->handoff", 2),
        ];
        let (statuses, fixed) = baseline.compare(&found);
        let statuses: Vec<Status> = statuses.into_iter().map(|(_, s)| s).collect();
        assert_eq!(
            statuses,
            vec![
                Status::Known,
                Status::Grew { was: 737 },
                Status::New,
                Status::Known,
                Status::Known,
                Status::Known,
            ]
        );
        assert_eq!(
            fixed,
            vec![
                "file crates/cloudletd/src/handoff.rs 2612 (now 2000)".to_string(),
                "fn crates/cloudletd/src/handoff.rs gone 200".to_string(),
            ]
        );
    }

    #[test]
    fn a_written_baseline_reads_back_and_allows_exactly_what_was_found() {
        let found = vec![
            offender(Check::Fn, "crates/qemu/src/vm.rs Vm::boot", 160),
            offender(Check::Fn, "crates/qemu/src/vm.rs Vm::boot", 170),
            offender(Check::Cycle, "qemu a<->b", 2),
        ];
        let baseline = Baseline::of(&found);
        let text = baseline.to_text();
        assert!(text.contains("fn crates/qemu/src/vm.rs Vm::boot 170\n"));
        assert!(text.contains("cycle qemu a<->b\n"));
        assert_eq!(Baseline::parse(&text).unwrap(), baseline);
        let (statuses, fixed) = baseline.compare(&found);
        assert!(statuses.iter().all(|(_, s)| !s.fails()));
        assert!(fixed.is_empty());
    }

    #[test]
    fn a_malformed_line_is_an_error() {
        for bad in [
            "dir crates/x 3",
            "file crates/x.rs",
            "fn crates/x.rs f",
            "fn crates/x.rs f many",
            "cycle qemu a<->b 2",
        ] {
            assert!(Baseline::parse(bad).is_err(), "{bad}");
        }
    }
}
