//! Functions over 150 lines in crates/cloudletd/src and crates/qemu/src.
//!
//! Why: a function that does not fit on two screens hides its steps; the
//! handoff's `send_vm` passed 700 lines. Every function with a body is
//! measured: free functions, methods of `impl` blocks, default methods of
//! traits, functions nested in others (which also count toward the one
//! around them), from the first line of the signature (after attributes and
//! doc comments) to the closing brace. A closure is part of its function.
//!
//! A function is named by where it is: `send_vm`; `Vm::boot` or
//! `Arc<Cloudlet>::create_vm` (the type of its `impl` block, or its
//! trait's name); `tests::roundtrip` (an inline module); `outer::inner` (a
//! nested function). Functions inside macro invocations
//! (`proptest! { .. }`) are not seen.

use anyhow::Context;
use proc_macro2::Span;
use quote::ToTokens;
use syn::spanned::Spanned;
use syn::visit::{self, Visit};

use crate::report::{Check, Offender};
use crate::sources::{self, SourceFile};

/// The most lines a function may span.
pub const MAX_FN_LINES: usize = 150;

pub fn check(files: &[SourceFile]) -> anyhow::Result<Vec<Offender>> {
    let mut found = Vec::new();
    for file in sources::limited(files) {
        for f in measure(&file.text).with_context(|| format!("Parsing {}", file.path))? {
            if f.lines > MAX_FN_LINES {
                found.push(Offender {
                    check: Check::Fn,
                    key: format!("{} {}", file.path, f.name),
                    measured: f.lines,
                    limit: MAX_FN_LINES,
                    at: vec![format!("{}:{}", file.path, f.line)],
                });
            }
        }
    }
    Ok(found)
}

/// One function's length.
#[derive(Debug, PartialEq, Eq)]
pub struct FnLength {
    pub name: String,
    /// Line of the signature (1-based).
    pub line: usize,
    pub lines: usize,
}

/// Every function with a body in `source`, in source order.
pub fn measure(source: &str) -> syn::Result<Vec<FnLength>> {
    let file = syn::parse_file(source)?;
    let mut visitor = FnVisitor::default();
    visitor.visit_file(&file);
    Ok(visitor.found)
}

#[derive(Default)]
struct FnVisitor {
    /// The enclosing inline modules, impl types, traits and functions.
    scope: Vec<String>,
    found: Vec<FnLength>,
}

impl FnVisitor {
    fn record(&mut self, sig: &syn::Signature, close: Span) {
        let start = sig.span().start().line;
        let end = close.end().line;
        let mut name = self.scope.clone();
        name.push(sig.ident.to_string());
        self.found.push(FnLength {
            name: name.join("::"),
            line: start,
            lines: end + 1 - start,
        });
    }

    fn within(&mut self, name: String, visit: impl FnOnce(&mut Self)) {
        self.scope.push(name);
        visit(self);
        self.scope.pop();
    }
}

impl<'ast> Visit<'ast> for FnVisitor {
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.record(&f.sig, f.block.brace_token.span.close());
        self.within(f.sig.ident.to_string(), |v| visit::visit_item_fn(v, f));
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.record(&f.sig, f.block.brace_token.span.close());
        self.within(f.sig.ident.to_string(), |v| visit::visit_impl_item_fn(v, f));
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.record(&f.sig, block.brace_token.span.close());
        }
        self.within(f.sig.ident.to_string(), |v| {
            visit::visit_trait_item_fn(v, f)
        });
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        // The type as written, without spaces: `Vm`, `Arc<Cloudlet>`.
        let name: String = i
            .self_ty
            .to_token_stream()
            .to_string()
            .split_whitespace()
            .collect();
        self.within(name, |v| visit::visit_item_impl(v, i));
    }

    fn visit_item_trait(&mut self, t: &'ast syn::ItemTrait) {
        self.within(t.ident.to_string(), |v| visit::visit_item_trait(v, t));
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.within(m.ident.to_string(), |v| visit::visit_item_mod(v, m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A free function spanning exactly `lines` lines, after a doc comment
    /// and an attribute (which do not count).
    fn fn_of(name: &str, lines: usize) -> String {
        let body = "    let _x = 1;\n".repeat(lines - 2);
        format!("/// Doc.\n#[inline]\npub fn {name}() {{\n{body}}}\n")
    }

    #[test]
    fn a_151_line_fn_fails_and_a_150_line_one_passes() {
        let source = format!("{}\n{}", fn_of("long", 151), fn_of("fits", 150));
        let files = [SourceFile::new("crates/qemu/src/vm.rs", &source)];
        let found = check(&files).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, "crates/qemu/src/vm.rs long");
        assert_eq!(found[0].measured, 151);
        assert_eq!(found[0].at, vec!["crates/qemu/src/vm.rs:3".to_string()]);
        // Other crates are not held to the limit.
        let files = [SourceFile::new("crates/handoff/src/lib.rs", &source)];
        assert!(check(&files).unwrap().is_empty());
    }

    #[test]
    fn methods_trait_defaults_nested_fns_and_closures_are_measured() {
        let source = r#"
struct Vm;
impl Vm<T> {
    pub async fn boot(
        &self,
    ) -> u8 {
        let f = |x: u8| {
            x + 1
        };
        fn helper() {
        }
        f(1)
    }
}
trait Driver {
    fn required(&self);
    fn default_one(&self) {
    }
}
mod tests {
    #[test]
    fn t() {}
}
"#;
        let found = measure(source).unwrap();
        let names: Vec<(&str, usize, usize)> = found
            .iter()
            .map(|f| (f.name.as_str(), f.line, f.lines))
            .collect();
        assert_eq!(
            names,
            vec![
                ("Vm<T>::boot", 4, 10),
                ("Vm<T>::boot::helper", 10, 2),
                ("Driver::default_one", 17, 2),
                ("tests::t", 22, 1),
            ]
        );
    }
}
