//! Files over 1,000 lines in crates/cloudletd/src and crates/qemu/src.
//!
//! Why: a file that keeps growing becomes the god file nobody can review
//! (handoff.rs passed 2,600 lines). Lines are counted as `wc -l` does.

use crate::report::{Check, Offender};
use crate::sources::{self, SourceFile};

/// The most lines a file may have.
pub const MAX_FILE_LINES: usize = 1_000;

pub fn check(files: &[SourceFile]) -> Vec<Offender> {
    sources::limited(files)
        .filter_map(|f| {
            let lines = f.text.lines().count();
            (lines > MAX_FILE_LINES).then(|| Offender {
                check: Check::File,
                key: f.path.clone(),
                measured: lines,
                limit: MAX_FILE_LINES,
                at: vec![f.path.clone()],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(path: &str, lines: usize) -> SourceFile {
        SourceFile::new(path, &"// x\n".repeat(lines))
    }

    #[test]
    fn a_file_over_the_limit_in_a_limited_crate_is_found() {
        let files = [
            file_of("crates/cloudletd/src/big.rs", 1_001),
            file_of("crates/qemu/src/limit.rs", 1_000),
            file_of("crates/handoff/src/other_crate.rs", 5_000),
            file_of("crates/qemu/tests/not_src.rs", 5_000),
        ];
        let found = check(&files);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, "crates/cloudletd/src/big.rs");
        assert_eq!(found[0].measured, 1_001);
    }
}
