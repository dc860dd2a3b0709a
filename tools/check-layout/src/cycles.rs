//! Import cycles between modules of crates/cloudletd and crates/qemu.
//!
//! Why: when `cloudlet` needs `handoff` and `handoff` needs `cloudlet`,
//! neither can be read, tested or moved to its own crate alone; a layered
//! crate has its modules in an order.
//!
//! Module A depends on module B when a file of A (its `a.rs` or anything
//! under `a/`) names `crate::b::..`, in a `use` item or in a path in the
//! code (types, expressions, patterns, and the tokens of macro calls).
//! `super::` and `self::` paths are resolved from the module they are
//! written in, so modules of one parent also depend on each other:
//! `handoff/wire.rs` naming `super::codec::Frame` or
//! `crate::handoff::codec::Frame` makes `handoff::wire` depend on
//! `handoff::codec`. The crate root (lib.rs) is no module of the graph:
//! it declares them all. A name reached through a re-export
//! (`crate::Cloudlet`) is not followed to the module that defines it.
//!
//! References in test code count too (a test module is part of its
//! module's file); an edge that only they make is marked `(all in test
//! code)`.
//!
//! Each strongly connected component of more than one module is a cycle,
//! reported with the references that make it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use proc_macro2::{Spacing, TokenStream, TokenTree};
use syn::visit::{self, Visit};

use crate::report::{Check, Offender};
use crate::sources::{self, SourceFile, LIMITED_CRATES};

pub fn check(files: &[SourceFile]) -> anyhow::Result<Vec<Offender>> {
    let mut found = Vec::new();
    for krate in LIMITED_CRATES {
        let prefix = sources::src_prefix(krate);
        let crate_files: Vec<(Vec<String>, &SourceFile)> = files
            .iter()
            .filter_map(|f| Some((module_of(f.path.strip_prefix(&prefix)?)?, f)))
            .collect();
        found.extend(cycles_in(krate, &crate_files)?);
    }
    Ok(found)
}

/// The module a file under `src/` defines: `a.rs` and `a/mod.rs` are `a`,
/// `a/b.rs` is `a::b`, `lib.rs` is the root; `main.rs` and `bin/` are
/// other crates (binaries), so None.
fn module_of(rel: &str) -> Option<Vec<String>> {
    if rel == "main.rs" || rel.starts_with("bin/") {
        return None;
    }
    let mut path: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if matches!(path.last().map(String::as_str), Some("mod" | "lib")) {
        path.pop();
    }
    Some(path)
}

/// A path that names something in the crate, resolved.
#[derive(Debug)]
struct Reference {
    /// The module it is written in.
    from: Vec<String>,
    /// What it names, from the crate root.
    to: Vec<String>,
    /// `file:line`, and the path as written.
    at: String,
    written: String,
    /// Whether it is in test code (`#[cfg(test)]`, `#[test]`).
    in_tests: bool,
}

fn cycles_in(krate: &str, files: &[(Vec<String>, &SourceFile)]) -> anyhow::Result<Vec<Offender>> {
    let mut modules: BTreeSet<Vec<String>> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut refs = Vec::new();
    for (module, file) in files {
        let ast = syn::parse_file(&file.text).with_context(|| format!("Parsing {}", file.path))?;
        let mut visitor = RefVisitor {
            current: module.clone(),
            test_depth: 0,
            file: &file.path,
            modules: &mut modules,
            refs: &mut refs,
        };
        visitor.visit_file(&ast);
    }
    // One graph per parent module: its child modules and the edges between them.
    type Edges<'r> = BTreeMap<(String, String), Vec<&'r Reference>>;
    let mut graphs: BTreeMap<Vec<String>, Edges> = BTreeMap::new();
    for r in &refs {
        if let Some((parent, a, b)) = edge(r, &modules) {
            graphs
                .entry(parent)
                .or_default()
                .entry((a, b))
                .or_default()
                .push(r);
        }
    }
    let mut found = Vec::new();
    for (parent, edges) in &graphs {
        let qualify = |m: &str| {
            let mut p = parent.clone();
            p.push(m.to_string());
            p.join("::")
        };
        for component in components(edges) {
            let names: Vec<String> = component.iter().map(|m| qualify(m)).collect();
            let mut at = Vec::new();
            for ((a, b), refs) in edges {
                if component.contains(a) && component.contains(b) {
                    let first = refs[0];
                    let mut line = format!(
                        "{} -> {}: {} `{}`",
                        qualify(a),
                        qualify(b),
                        first.at,
                        first.written
                    );
                    if refs.len() > 1 {
                        line.push_str(&format!(" (and {} more)", refs.len() - 1));
                    }
                    if refs.iter().all(|r| r.in_tests) {
                        line.push_str(" (all in test code)");
                    }
                    at.push(line);
                }
            }
            found.push(Offender {
                check: Check::Cycle,
                key: format!("{krate} {}", names.join("<->")),
                measured: names.len(),
                limit: 1,
                at,
            });
        }
    }
    Ok(found)
}

/// The graph a reference is an edge of: the longest module both ends share
/// (the parent), and the children of it that the two ends are in. None
/// for a reference to the module itself, its parent, its own children, or
/// something that is not a module (an item of the parent).
fn edge(r: &Reference, modules: &BTreeSet<Vec<String>>) -> Option<(Vec<String>, String, String)> {
    let p = r.from.iter().zip(&r.to).take_while(|(a, b)| a == b).count();
    if r.from.len() <= p || r.to.len() <= p || !modules.contains(&r.to[..=p]) {
        return None;
    }
    Some((r.from[..p].to_vec(), r.from[p].clone(), r.to[p].clone()))
}

/// The strongly connected components of more than one node.
fn components(edges: &BTreeMap<(String, String), Vec<&Reference>>) -> Vec<BTreeSet<String>> {
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        next.entry(a).or_default().insert(b);
        next.entry(b).or_default();
    }
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from];
        while let Some(n) = todo.pop() {
            for &m in &next[n] {
                if seen.insert(m) {
                    todo.push(m);
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&str, BTreeSet<&str>> = next.keys().map(|&n| (n, reach(n))).collect();
    let mut assigned = BTreeSet::new();
    let mut found = Vec::new();
    for (&n, from_n) in &reached {
        if assigned.contains(n) {
            continue;
        }
        let mut component: BTreeSet<String> = from_n
            .iter()
            .filter(|m| reached[**m].contains(n))
            .map(|m| m.to_string())
            .collect();
        component.insert(n.to_string());
        assigned.extend(component.clone());
        if component.len() > 1 {
            found.push(component);
        }
    }
    found
}

/// From a path as written (`super::codec::Frame`) in module `current`, what
/// it names from the crate root; None for a path that does not start at
/// `crate`, `self` or `super` (an external crate, a local or imported name).
fn resolve(current: &[String], written: &[String]) -> Option<Vec<String>> {
    let (mut to, mut rest) = match written.first()?.as_str() {
        "crate" => (Vec::new(), &written[1..]),
        "self" => (current.to_vec(), &written[1..]),
        "super" => (current.to_vec(), written),
        _ => return None,
    };
    while rest.first().map(String::as_str) == Some("super") {
        to.pop()?;
        rest = &rest[1..];
    }
    to.extend(rest.iter().cloned());
    Some(to)
}

struct RefVisitor<'a> {
    /// The module being read: the file's, and the inline modules around.
    current: Vec<String>,
    /// How many test items (`#[cfg(test)] mod tests`) are around.
    test_depth: usize,
    file: &'a str,
    modules: &'a mut BTreeSet<Vec<String>>,
    refs: &'a mut Vec<Reference>,
}

impl RefVisitor<'_> {
    /// Visits an item with `attrs`, counting it as test code if it is.
    fn item(&mut self, attrs: &[syn::Attribute], visit: impl FnOnce(&mut Self)) {
        let test = attrs.iter().any(|a| {
            a.path().is_ident("test")
                || (a.path().is_ident("cfg")
                    && a.meta
                        .require_list()
                        .is_ok_and(|l| l.tokens.to_string() == "test"))
        });
        self.test_depth += usize::from(test);
        visit(self);
        self.test_depth -= usize::from(test);
    }

    fn add(&mut self, written: Vec<String>, line: usize) {
        if let Some(to) = resolve(&self.current, &written) {
            self.refs.push(Reference {
                from: self.current.clone(),
                to,
                at: format!("{}:{line}", self.file),
                written: written.join("::"),
                in_tests: self.test_depth > 0,
            });
        }
    }

    fn add_use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        let add_name = |v: &mut Self, ident: &syn::Ident| {
            let mut written = prefix.clone();
            if ident != "self" {
                written.push(ident.to_string());
            }
            v.add(written, ident.span().start().line);
        };
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.add_use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => add_name(self, &n.ident),
            syn::UseTree::Rename(r) => add_name(self, &r.ident),
            syn::UseTree::Glob(g) => {
                let mut written = prefix.clone();
                written.push("*".to_string());
                self.add(written, g.star_token.span.start().line);
            }
            syn::UseTree::Group(g) => {
                for tree in &g.items {
                    self.add_use_tree(prefix, tree);
                }
            }
        }
    }

    /// Paths in a macro's tokens: `crate`, `self` or `super` then `:: name`s.
    fn add_token_paths(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            if let TokenTree::Group(g) = &tokens[i] {
                self.add_token_paths(g.stream());
            }
            let TokenTree::Ident(start) = &tokens[i] else {
                i += 1;
                continue;
            };
            let mut written = vec![start.to_string()];
            i += 1;
            while let [TokenTree::Punct(c1), TokenTree::Punct(c2), TokenTree::Ident(name), ..] =
                &tokens[i..]
            {
                if c1.as_char() != ':' || c1.spacing() != Spacing::Joint || c2.as_char() != ':' {
                    break;
                }
                written.push(name.to_string());
                i += 3;
            }
            if written.len() > 1 {
                self.add(written, start.span().start().line);
            }
        }
    }
}

impl<'ast> Visit<'ast> for RefVisitor<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.current.push(m.ident.to_string());
        self.modules.insert(self.current.clone());
        self.item(&m.attrs, |v| visit::visit_item_mod(v, m));
        self.current.pop();
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.item(&f.attrs, |v| visit::visit_item_fn(v, f));
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if u.leading_colon.is_none() {
            self.item(&u.attrs, |v| v.add_use_tree(&mut Vec::new(), &u.tree));
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() {
            if let Some(first) = p.segments.first() {
                let written = p.segments.iter().map(|s| s.ident.to_string()).collect();
                self.add(written, first.ident.span().start().line);
            }
        }
        visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.add_token_paths(m.tokens.clone());
        visit::visit_macro(self, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(files: &[SourceFile]) -> Vec<(String, Vec<String>)> {
        check(files)
            .unwrap()
            .into_iter()
            .map(|o| (o.key, o.at))
            .collect()
    }

    #[test]
    fn a_cycle_of_two_modules_is_found_with_its_references() {
        let files = [
            SourceFile::new(
                "crates/cloudletd/src/lib.rs",
                "pub mod a; pub mod b; pub mod c; pub use a::A;",
            ),
            SourceFile::new(
                "crates/cloudletd/src/a.rs",
                "use crate::b::B;\npub struct A;\n#[cfg(test)]\nmod tests { use super::*; }\n",
            ),
            SourceFile::new(
                "crates/cloudletd/src/b.rs",
                "pub struct B;\nfn f() -> crate::a::A { crate::a::A }\n",
            ),
            // c needs a and b, nothing needs c: no cycle.
            SourceFile::new(
                "crates/cloudletd/src/c.rs",
                "use crate::{a::A, b::{self, B}};",
            ),
            // main.rs is another crate.
            SourceFile::new("crates/cloudletd/src/main.rs", "mod c; use crate::c::x;"),
        ];
        assert_eq!(
            keys(&files),
            vec![(
                "cloudletd a<->b".to_string(),
                vec![
                    "a -> b: crates/cloudletd/src/a.rs:1 `crate::b::B`".to_string(),
                    "b -> a: crates/cloudletd/src/b.rs:2 `crate::a::A` (and 1 more)".to_string(),
                ]
            )]
        );
    }

    #[test]
    fn submodules_of_a_directory_module_are_checked_and_macros_read() {
        let files = [
            SourceFile::new("crates/qemu/src/lib.rs", "pub mod d;"),
            SourceFile::new(
                "crates/qemu/src/d/mod.rs",
                "mod x; mod y; pub struct Shared;",
            ),
            SourceFile::new(
                "crates/qemu/src/d/x.rs",
                "use super::y::Y;\nuse super::Shared;\npub struct X;\n",
            ),
            SourceFile::new(
                "crates/qemu/src/d/y.rs",
                "pub struct Y;\nfn g() {\n    tokio::select! { _ = crate::d::x::go() => {} }\n}\n\
                 #[cfg(test)]\nmod tests {\n    use super::super::x::X;\n}\n",
            ),
        ];
        assert_eq!(
            keys(&files),
            vec![(
                "qemu d::x<->d::y".to_string(),
                vec![
                    "d::x -> d::y: crates/qemu/src/d/x.rs:1 `super::y::Y`".to_string(),
                    "d::y -> d::x: crates/qemu/src/d/y.rs:3 `crate::d::x::go` (and 1 more)"
                        .to_string(),
                ]
            )]
        );
    }

    #[test]
    fn an_edge_made_only_by_test_code_is_marked() {
        let files = [
            SourceFile::new("crates/qemu/src/a.rs", "use crate::b::X;"),
            SourceFile::new(
                "crates/qemu/src/b.rs",
                "#[cfg(test)]\nmod tests {\n    #[test]\n    fn t() { crate::a::f(); }\n}\n",
            ),
        ];
        let found = keys(&files);
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].1[1],
            "b -> a: crates/qemu/src/b.rs:4 `crate::a::f` (all in test code)"
        );
    }

    #[test]
    fn a_three_module_cycle_is_one_component() {
        let files = [
            SourceFile::new("crates/qemu/src/a.rs", "use crate::b::X;"),
            SourceFile::new("crates/qemu/src/b.rs", "use crate::c::X;"),
            SourceFile::new("crates/qemu/src/c.rs", "use crate::a::X; use crate::d::X;"),
            SourceFile::new("crates/qemu/src/d.rs", ""),
        ];
        let found = keys(&files);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "qemu a<->b<->c");
        assert_eq!(found[0].1.len(), 3);
    }
}
