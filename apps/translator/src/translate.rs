//! Word-by-word translation that keeps spacing, punctuation and capitalization.

use std::collections::HashSet;

use serde::Serialize;

use crate::dict::Dictionary;

/// Result of [`translate`], as `/translate` answers it in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Translation {
    /// The input with every known word replaced by its translation.
    #[serde(rename = "translation")]
    pub text: String,
    /// Words not in the dictionary, lowercased, each once, in order of appearance.
    pub unknown: Vec<String>,
}

/// Translates `input`. Words are maximal runs of alphanumeric characters; everything
/// else is copied unchanged. Unknown words are kept as they are; numbers are never
/// unknown. `Word` gives `Translation`, `WORD` gives `TRANSLATION`.
pub fn translate(dict: &Dictionary, input: &str) -> Translation {
    let mut text = String::with_capacity(input.len() + input.len() / 4);
    let mut unknown = Vec::new();
    let mut seen_unknown = HashSet::new();
    let mut rest = input;
    while !rest.is_empty() {
        let word_len = rest
            .char_indices()
            .find(|(_, c)| !c.is_alphanumeric())
            .map_or(rest.len(), |(i, _)| i);
        if word_len == 0 {
            let gap_len = rest
                .char_indices()
                .find(|(_, c)| c.is_alphanumeric())
                .map_or(rest.len(), |(i, _)| i);
            text.push_str(&rest[..gap_len]);
            rest = &rest[gap_len..];
            continue;
        }
        let word = &rest[..word_len];
        rest = &rest[word_len..];
        let lower = word.to_lowercase();
        match dict.get(&lower) {
            Some(translation) => push_with_case_of(&mut text, translation, word),
            None => {
                text.push_str(word);
                if !word.chars().all(char::is_numeric) && seen_unknown.insert(lower.clone()) {
                    unknown.push(lower);
                }
            }
        }
    }
    Translation { text, unknown }
}

fn push_with_case_of(out: &mut String, translation: &str, original: &str) {
    let mut chars = original.chars();
    let first_upper = chars.next().is_some_and(char::is_uppercase);
    let all_upper = original.chars().count() > 1 && original.chars().all(|c| !c.is_lowercase());
    if all_upper && first_upper {
        out.push_str(&translation.to_uppercase());
    } else if first_upper {
        let mut t = translation.chars();
        if let Some(first) = t.next() {
            out.extend(first.to_uppercase());
            out.push_str(t.as_str());
        }
    } else {
        out.push_str(translation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict() -> Dictionary {
        let text = "hello\tsalve\nworld\tmundus\ncafé\ttaberna\n";
        Dictionary::read_from(text.as_bytes(), std::path::Path::new("t")).unwrap()
    }

    fn tr(s: &str) -> (String, Vec<String>) {
        let t = translate(&dict(), s);
        (t.text, t.unknown)
    }

    #[test]
    fn translates_known_words() {
        assert_eq!(tr("hello world"), ("salve mundus".into(), vec![]));
        assert_eq!(tr(""), (String::new(), vec![]));
    }

    #[test]
    fn keeps_punctuation_spacing_and_case() {
        assert_eq!(
            tr("  Hello,\tWORLD!\n"),
            ("  Salve,\tMUNDUS!\n".into(), vec![])
        );
        assert_eq!(tr("Café-hello"), ("Taberna-salve".into(), vec![]));
    }

    #[test]
    fn reports_unknown_words_once_in_order() {
        assert_eq!(
            tr("hello Foo bar foo 42 world baz"),
            (
                "salve Foo bar foo 42 mundus baz".into(),
                vec!["foo".into(), "bar".into(), "baz".into()]
            )
        );
    }

    #[test]
    fn punctuation_only_input_is_unchanged() {
        assert_eq!(tr("?! ..."), ("?! ...".into(), vec![]));
    }
}
