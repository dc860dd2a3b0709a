//! `check-layout`: the layout rules of the crate redesign, counted, so that
//! CI holds them once they are met and a change cannot undo them.
//!
//! Over the workspace's Rust sources it checks:
//!
//! - [`file_len`]: no file over 1,000 lines in crates/cloudletd/src and
//!   crates/qemu/src;
//! - [`fn_len`]: no function over 150 lines there;
//! - [`qmp`]: no raw QMP command string (`.execute("query-migrate", ..)`)
//!   outside crates/qemu;
//! - [`cycles`]: no import cycle between the modules of those two crates.
//!
//! It prints a table per check and a summary line, and exits with 1 when a
//! check fails (2 when it cannot run: a bad argument, a file it cannot read
//! or parse). Today's code still has offenders, so [`baseline`] lets CI
//! ratchet: with `--baseline FILE` only a new offender, or a known one that
//! grew, fails, and the baseline lines that are fixed are printed.
//!
//! ```text
//! cargo run -q -p check-layout -- [--root DIR] [--baseline FILE] [--write-baseline FILE]
//! ```

mod baseline;
mod cycles;
mod file_len;
mod fn_len;
mod qmp;
mod report;
mod sources;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::baseline::Baseline;

const USAGE: &str = "\
Usage: check-layout [--root DIR] [--baseline FILE] [--write-baseline FILE]

Checks crates/cloudletd and crates/qemu for files over 1,000 lines, functions
over 150 lines and import cycles between modules, and the whole workspace for
raw QMP command strings outside crates/qemu. Exits with 1 when a check fails,
2 when it cannot run.

  --root DIR              the workspace (default: the current directory)
  --baseline FILE         known offenders: fail only on new ones or ones that grew
  --write-baseline FILE   write today's offenders to FILE (and exit 0)";

#[derive(Debug, Default)]
struct Args {
    root: Option<PathBuf>,
    baseline: Option<PathBuf>,
    write_baseline: Option<PathBuf>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut parsed = Args::default();
    while let Some(arg) = args.next() {
        let slot = match arg.as_str() {
            "--root" => &mut parsed.root,
            "--baseline" => &mut parsed.baseline,
            "--write-baseline" => &mut parsed.write_baseline,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("Unknown argument {other:?}\n\n{USAGE}"),
        };
        let Some(value) = args.next() else {
            bail!("{arg} needs a value\n\n{USAGE}");
        };
        *slot = Some(PathBuf::from(value));
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("check-layout: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the checks; Ok(false) when one fails.
fn run() -> anyhow::Result<bool> {
    let args = parse_args(std::env::args().skip(1))?;
    let root = args.root.unwrap_or_else(|| PathBuf::from("."));
    if !root.join("crates/cloudletd/src").is_dir() {
        bail!(
            "{} holds no crates/cloudletd/src: pass the workspace with --root",
            root.display()
        );
    }
    let files = sources::read_all(&root)?;

    let mut found = file_len::check(&files);
    found.extend(fn_len::check(&files)?);
    found.extend(qmp::check(&files)?);
    found.extend(cycles::check(&files)?);

    if let Some(path) = &args.write_baseline {
        let baseline = Baseline::of(&found);
        std::fs::write(path, baseline.to_text())
            .with_context(|| format!("Writing {}", path.display()))?;
        println!(
            "check-layout: wrote {} offenders to {}",
            baseline.len(),
            path.display()
        );
        return Ok(true);
    }

    let baseline = match &args.baseline {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("Reading {}", path.display()))?;
            Some(Baseline::parse(&text).with_context(|| format!("Reading {}", path.display()))?)
        }
        None => None,
    };
    let (statuses, fixed) = baseline
        .as_ref()
        .unwrap_or(&Baseline::default())
        .compare(&found);
    print!(
        "{}",
        report::render(&statuses, &fixed, baseline.as_ref().map(Baseline::len))
    );
    Ok(!statuses.iter().any(|(_, s)| s.fails()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_parsed() {
        let args = ["--root", "/w", "--baseline", "b.txt"].map(String::from);
        let args = parse_args(args.into_iter()).unwrap();
        assert_eq!(args.root, Some(PathBuf::from("/w")));
        assert_eq!(args.baseline, Some(PathBuf::from("b.txt")));
        assert_eq!(args.write_baseline, None);
        assert!(parse_args(["--baseline"].map(String::from).into_iter()).is_err());
        assert!(parse_args(["--verbose"].map(String::from).into_iter()).is_err());
    }
}
