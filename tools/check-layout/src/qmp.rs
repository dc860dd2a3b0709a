//! Raw QMP command strings outside crates/qemu.
//!
//! Why: crates/qemu is the only crate that speaks QMP. A caller elsewhere
//! that writes `q.execute("migrate-set-capabilities", ..)` depends on QEMU's
//! wire names and JSON shapes, which crates/qemu should wrap in typed
//! methods (`vm.query_migrate()`), tested in one place.
//!
//! Found: a method call named `execute` or `execute_with_timeout` whose
//! first argument is a string literal, in any `.rs` file of the workspace
//! outside crates/qemu (src/, tests/, benches, examples). The file is read
//! as tokens rather than as a syntax tree so that calls inside macros
//! (`tokio::select!`, `assert!`) are found too; comments and string
//! contents are not code and are not searched. An offender is one command
//! in one file, measured by how many times it is called there.

use std::collections::BTreeMap;

use anyhow::Context;
use proc_macro2::{Delimiter, TokenStream, TokenTree};

use crate::report::{Check, Offender};
use crate::sources::SourceFile;

/// The method names of crates/qemu's QMP client that take a command name.
const METHODS: [&str; 2] = ["execute", "execute_with_timeout"];

/// The one crate allowed to name QMP commands.
const QEMU_CRATE: &str = "crates/qemu/";

pub fn check(files: &[SourceFile]) -> anyhow::Result<Vec<Offender>> {
    let mut found = Vec::new();
    for file in files.iter().filter(|f| !f.path.starts_with(QEMU_CRATE)) {
        let calls = raw_calls(&file.text).with_context(|| format!("Parsing {}", file.path))?;
        let mut by_command: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for call in calls {
            by_command.entry(call.command).or_default().push(call.line);
        }
        for (command, lines) in by_command {
            let lines: Vec<String> = lines.iter().map(usize::to_string).collect();
            found.push(Offender {
                check: Check::Qmp,
                key: format!("{} {command}", file.path),
                measured: lines.len(),
                limit: 0,
                at: vec![format!("{}:{}", file.path, lines.join(","))],
            });
        }
    }
    Ok(found)
}

/// One `.execute("command", ..)`.
#[derive(Debug, PartialEq, Eq)]
pub struct RawCall {
    pub command: String,
    pub line: usize,
}

/// Every raw QMP call in `source`, in source order.
pub fn raw_calls(source: &str) -> anyhow::Result<Vec<RawCall>> {
    let tokens: TokenStream = source
        .parse()
        .map_err(|e| anyhow::anyhow!("Not Rust tokens: {e}"))?;
    let mut calls = Vec::new();
    scan(tokens, &mut calls);
    Ok(calls)
}

/// Looks for `.` `execute` `( "literal"` at every depth of nesting.
fn scan(tokens: TokenStream, calls: &mut Vec<RawCall>) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    for (i, token) in tokens.iter().enumerate() {
        if let TokenTree::Group(g) = token {
            scan(g.stream(), calls);
        }
        let [TokenTree::Punct(dot), TokenTree::Ident(method), TokenTree::Group(args)] =
            &tokens[i..(i + 3).min(tokens.len())]
        else {
            continue;
        };
        if dot.as_char() != '.'
            || !METHODS.iter().any(|m| method == m)
            || args.delimiter() != Delimiter::Parenthesis
        {
            continue;
        }
        let Some(TokenTree::Literal(first)) = args.stream().into_iter().next() else {
            continue;
        };
        if let Ok(command) = syn::parse2::<syn::LitStr>(TokenTree::Literal(first.clone()).into()) {
            calls.push(RawCall {
                command: command.value(),
                line: first.span().start().line,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"
async fn f(q: &Qmp, name: &str) {
    // q.execute("in-a-comment", None)
    let _ = q.execute("stop", None).await;
    q.execute(name, None).await;
    vm.qmp()
        .execute_with_timeout(
            "query-migrate",
            None,
            T,
        )
        .await;
    tokio::select! {
        v = q.execute("query-migrate", None) => {}
    }
    let s = "q.execute(\"in-a-string\")";
    execute("not-a-method-call");
}
"#;

    #[test]
    fn raw_calls_are_found_with_their_lines() {
        let calls = raw_calls(SOURCE).unwrap();
        let calls: Vec<(&str, usize)> =
            calls.iter().map(|c| (c.command.as_str(), c.line)).collect();
        assert_eq!(
            calls,
            vec![("stop", 4), ("query-migrate", 8), ("query-migrate", 14)]
        );
    }

    #[test]
    fn a_raw_call_outside_crates_qemu_is_found_and_one_inside_is_not() {
        let files = [
            SourceFile::new("crates/cloudletd/src/handoff.rs", SOURCE),
            SourceFile::new("crates/handoff/tests/common/mod.rs", SOURCE),
            SourceFile::new("crates/qemu/src/vm.rs", SOURCE),
            SourceFile::new("crates/qemu/tests/boot.rs", SOURCE),
        ];
        let found = check(&files).unwrap();
        let keys: Vec<(&str, usize)> = found.iter().map(|o| (o.key.as_str(), o.measured)).collect();
        assert_eq!(
            keys,
            vec![
                ("crates/cloudletd/src/handoff.rs query-migrate", 2),
                ("crates/cloudletd/src/handoff.rs stop", 1),
                ("crates/handoff/tests/common/mod.rs query-migrate", 2),
                ("crates/handoff/tests/common/mod.rs stop", 1),
            ]
        );
        assert_eq!(
            found[0].at,
            vec!["crates/cloudletd/src/handoff.rs:8,14".to_string()]
        );
    }
}
