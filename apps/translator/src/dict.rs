//! The dictionary: file format, deterministic generation and loading.
//!
//! # File format (version 1)
//!
//! UTF-8 text, one entry per line: `word<TAB>translation<LF>` (a CR before the LF is
//! ignored). Lines that are empty or start with `#` are comments. Generated files start
//! with a header comment `# cloudlet-translator-dict v1 entries=N seed=S`; the loader
//! uses `entries=` only to size its table. Words are matched case-insensitively (they
//! are stored lowercased); when a word appears twice, the later line wins.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

pub const HEADER_PREFIX: &str = "# cloudlet-translator-dict v1";

/// A few real English -> Latin entries that come first in every generated dictionary,
/// so demos can translate actual sentences.
const REAL_WORDS: &[(&str, &str)] = &[
    ("hello", "salve"),
    ("world", "mundus"),
    ("goodbye", "vale"),
    ("friend", "amicus"),
    ("water", "aqua"),
    ("fire", "ignis"),
    ("earth", "terra"),
    ("sky", "caelum"),
    ("sun", "sol"),
    ("moon", "luna"),
    ("star", "stella"),
    ("city", "urbs"),
    ("road", "via"),
    ("book", "liber"),
    ("word", "verbum"),
    ("language", "lingua"),
    ("time", "tempus"),
    ("day", "dies"),
    ("night", "nox"),
    ("love", "amor"),
    ("war", "bellum"),
    ("peace", "pax"),
    ("king", "rex"),
    ("queen", "regina"),
    ("man", "vir"),
    ("woman", "femina"),
    ("child", "puer"),
    ("house", "domus"),
    ("god", "deus"),
    ("life", "vita"),
    ("death", "mors"),
    ("truth", "veritas"),
    ("light", "lux"),
    ("voice", "vox"),
    ("name", "nomen"),
    ("heart", "cor"),
    ("hand", "manus"),
    ("eye", "oculus"),
    ("head", "caput"),
    ("sea", "mare"),
    ("mountain", "mons"),
    ("river", "flumen"),
    ("tree", "arbor"),
    ("flower", "flos"),
    ("bread", "panis"),
    ("wine", "vinum"),
    ("good", "bonus"),
    ("bad", "malus"),
    ("big", "magnus"),
    ("small", "parvus"),
    ("new", "novus"),
    ("old", "vetus"),
    ("i", "ego"),
    ("you", "tu"),
    ("we", "nos"),
    ("and", "et"),
    ("is", "est"),
    ("not", "non"),
    ("with", "cum"),
    ("the", "ille"),
    ("cloud", "nubes"),
    ("edge", "margo"),
    ("machine", "machina"),
    ("computer", "computatrum"),
    ("fast", "celer"),
];

const EN_ONSETS: &[&str] = &[
    "", "", "b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr",
    "h", "j", "k", "l", "m", "n", "p", "pl", "pr", "qu", "r", "s", "sc", "sh", "sk", "sl", "sm",
    "sn", "sp", "st", "str", "sw", "t", "th", "tr", "tw", "v", "w", "wh", "y", "z",
];
const EN_VOWELS: &[&str] = &[
    "a", "a", "e", "e", "i", "i", "o", "o", "u", "ai", "ea", "ee", "oo", "ou", "ow", "y",
];
const EN_CODAS: &[&str] = &[
    "", "", "", "", "b", "ck", "d", "ft", "g", "k", "l", "ld", "ll", "m", "mp", "n", "nd", "ng",
    "nk", "nt", "p", "r", "rd", "rk", "rn", "rt", "s", "sh", "sk", "ss", "st", "t", "th", "x",
];
const EN_SUFFIXES: &[&str] = &[
    "", "", "", "", "", "ing", "er", "ly", "ness", "ment", "ful", "less", "ed", "tion", "able",
];
const LA_CONSONANTS: &[&str] = &[
    "b", "c", "d", "f", "g", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "x", "pr", "tr", "st",
    "sc",
];
const LA_VOWELS: &[&str] = &["a", "a", "e", "e", "i", "i", "o", "u", "u", "ae", "au"];
const LA_ENDINGS: &[&str] = &[
    "us", "um", "a", "ae", "is", "em", "orum", "ibus", "ans", "ens", "itas", "io", "or", "ere",
    "are", "ire",
];

/// SplitMix64: tiny, deterministic across platforms and releases (unlike `rand`).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough index below `n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// An English-looking pseudo word of 2 to 5 syllables, maybe with a suffix.
fn english_word(rng: &mut SplitMix64, out: &mut String) {
    out.clear();
    let syllables = 2 + rng.below(4);
    for _ in 0..syllables {
        out.push_str(rng.pick(EN_ONSETS));
        out.push_str(rng.pick(EN_VOWELS));
        out.push_str(rng.pick(EN_CODAS));
    }
    out.push_str(rng.pick(EN_SUFFIXES));
}

/// A Latin-looking pseudo word of 2 to 4 syllables plus an inflection ending.
fn latin_word(rng: &mut SplitMix64, out: &mut String) {
    out.clear();
    if rng.below(4) == 0 {
        out.push_str(rng.pick(LA_VOWELS));
    }
    let syllables = 2 + rng.below(3);
    for _ in 0..syllables {
        out.push_str(rng.pick(LA_CONSONANTS));
        out.push_str(rng.pick(LA_VOWELS));
    }
    out.push_str(rng.pick(LA_CONSONANTS));
    out.push_str(rng.pick(LA_ENDINGS));
}

/// Calls `emit(word, translation)` for `entries` entries generated from `seed`: the
/// built-in real words first, then unique pseudo words. The same arguments always
/// give the same sequence.
pub fn generate_entries(entries: usize, seed: u64, mut emit: impl FnMut(&str, &str)) {
    let mut rng = SplitMix64::new(seed);
    let mut seen: HashSet<Box<str>> = HashSet::with_capacity(entries);
    for &(w, t) in REAL_WORDS.iter().take(entries) {
        seen.insert(w.into());
        emit(w, t);
    }
    let (mut word, mut translation) = (String::new(), String::new());
    while seen.len() < entries {
        english_word(&mut rng, &mut word);
        latin_word(&mut rng, &mut translation);
        if !seen.contains(word.as_str()) {
            seen.insert(word.as_str().into());
            emit(&word, &translation);
        }
    }
}

/// What [`write_dictionary`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneratedDict {
    pub entries: usize,
    pub file_bytes: u64,
}

/// Error from [`write_dictionary`].
#[derive(Debug)]
pub struct WriteDictError {
    pub path: PathBuf,
    pub source: io::Error,
}

impl fmt::Display for WriteDictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Cannot write dictionary {}: {}",
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for WriteDictError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Writes a generated dictionary to `out` atomically (temporary file, fsync, rename).
pub fn write_dictionary(
    out: &Path,
    entries: usize,
    seed: u64,
) -> Result<GeneratedDict, WriteDictError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteDictError { path, source }
    };
    let mut tmp_name = out.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = out.with_file_name(tmp_name);
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        writeln!(w, "{HEADER_PREFIX} entries={entries} seed={seed}")?;
        let mut io_result = Ok(());
        generate_entries(entries, seed, |word, translation| {
            if io_result.is_ok() {
                io_result = writeln!(w, "{word}\t{translation}");
            }
        });
        io_result?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let file_bytes = file.metadata()?.len();
        drop(file);
        std::fs::rename(&tmp, out)?;
        Ok(GeneratedDict {
            entries,
            file_bytes,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err(out))
}

/// Error from [`load_dictionary`], with the offending line where there is one.
#[derive(Debug)]
pub enum LoadDictError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    Malformed {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
}

impl fmt::Display for LoadDictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadDictError::Io { path, source } => {
                write!(f, "Cannot read dictionary {}: {source}", path.display())
            }
            LoadDictError::Malformed { path, line, reason } => {
                write!(
                    f,
                    "Malformed dictionary {} line {line}: {reason}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for LoadDictError {}

/// An in-memory dictionary: a hash map of owned, lowercased words.
#[derive(Debug, Default)]
pub struct Dictionary {
    map: HashMap<Box<str>, Box<str>>,
    /// Sum of the lengths of all words and translations.
    bytes: u64,
}

impl Dictionary {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Looks up an already lowercased word.
    pub fn get(&self, lowercase_word: &str) -> Option<&str> {
        self.map.get(lowercase_word).map(|t| &**t)
    }

    /// Adds an entry (the word is lowercased); a later insert replaces an earlier one.
    pub fn insert(&mut self, word: &str, translation: &str) {
        let key: Box<str> = if word.chars().any(char::is_uppercase) {
            word.to_lowercase().into()
        } else {
            word.into()
        };
        let key_len = key.len() as u64;
        if let Some(old) = self.map.insert(key, translation.into()) {
            self.bytes -= key_len + old.len() as u64;
        }
        self.bytes += key_len + translation.len() as u64;
    }

    /// Parses the dictionary format from `r`; `path` is only used in errors.
    pub fn read_from<R: BufRead>(mut r: R, path: &Path) -> Result<Self, LoadDictError> {
        let malformed = |line, reason| LoadDictError::Malformed {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let mut dict = Dictionary::default();
        let mut buf = Vec::with_capacity(256);
        let mut line_no = 0usize;
        loop {
            buf.clear();
            let n = r
                .read_until(b'\n', &mut buf)
                .map_err(|source| LoadDictError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let line = std::str::from_utf8(&buf).map_err(|_| malformed(line_no, "not UTF-8"))?;
            let line = line.strip_suffix('\n').unwrap_or(line);
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                if line_no == 1 {
                    if let Some(n) = header_entries(comment) {
                        // A hint only: bounded so a lying header cannot exhaust memory.
                        dict.map.reserve(n.min(16 << 20));
                    }
                }
                continue;
            }
            let (word, translation) = line
                .split_once('\t')
                .ok_or_else(|| malformed(line_no, "no TAB between word and translation"))?;
            if word.is_empty() || translation.is_empty() {
                return Err(malformed(line_no, "empty word or translation"));
            }
            if translation.contains('\t') {
                return Err(malformed(line_no, "more than one TAB"));
            }
            dict.insert(word, translation);
        }
        dict.map.shrink_to_fit();
        Ok(dict)
    }
}

fn header_entries(comment: &str) -> Option<usize> {
    let rest = format!("#{comment}");
    let rest = rest.strip_prefix(HEADER_PREFIX)?;
    rest.split_whitespace()
        .find_map(|kv| kv.strip_prefix("entries="))
        .and_then(|n| n.parse().ok())
}

/// Opens `path` (so a missing file is reported at once) and returns a loader to run,
/// possibly on another thread.
pub fn open_dictionary(
    path: &Path,
) -> Result<impl FnOnce() -> Result<Dictionary, LoadDictError>, LoadDictError> {
    let file = File::open(path).map_err(|source| LoadDictError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    Ok(move || Dictionary::read_from(BufReader::with_capacity(1 << 20, file), &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(entries: usize, seed: u64) -> Vec<(String, String)> {
        let mut out = Vec::new();
        generate_entries(entries, seed, |w, t| {
            out.push((w.to_string(), t.to_string()))
        });
        out
    }

    #[test]
    fn generation_is_deterministic_and_seed_dependent() {
        let a = generated(5000, 7);
        assert_eq!(a, generated(5000, 7));
        assert_ne!(a, generated(5000, 8));
        // A shorter run is a prefix of a longer one with the same seed.
        assert_eq!(generated(3000, 7)[..], a[..3000]);
    }

    #[test]
    fn generated_words_are_unique_lowercase_and_tab_free() {
        let entries = generated(20_000, 1);
        assert_eq!(entries.len(), 20_000);
        let unique: HashSet<&str> = entries.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(unique.len(), entries.len());
        for (w, t) in &entries {
            assert!(!w.is_empty() && !t.is_empty());
            assert!(w.bytes().all(|b| b.is_ascii_lowercase()), "{w}");
            assert!(t.bytes().all(|b| b.is_ascii_lowercase()), "{t}");
        }
        assert_eq!(entries[0], ("hello".to_string(), "salve".to_string()));
        assert_eq!(generated(2, 1).len(), 2);
        assert!(generated(0, 1).is_empty());
    }

    #[test]
    fn average_entry_size_gives_tens_of_megabytes_per_million() {
        let entries = generated(20_000, 3);
        let bytes: usize = entries.iter().map(|(w, t)| w.len() + t.len() + 2).sum();
        let per_million_mb = bytes as f64 / 20_000.0;
        assert!(
            (25.0..60.0).contains(&per_million_mb),
            "{per_million_mb} MB per million"
        );
    }

    #[test]
    fn write_then_load_roundtrip() {
        let path =
            std::env::temp_dir().join(format!("translator-dict-test-{}.tsv", std::process::id()));
        let info = write_dictionary(&path, 3000, 42).unwrap();
        assert_eq!(info.entries, 3000);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# cloudlet-translator-dict v1 entries=3000 seed=42\nhello\tsalve\n")
        );
        assert_eq!(info.file_bytes, text.len() as u64);
        let dict = open_dictionary(&path).unwrap()().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(dict.len(), 3000);
        for (w, t) in generated(3000, 42) {
            assert_eq!(dict.get(&w), Some(t.as_str()));
        }
        let expected: u64 = generated(3000, 42)
            .iter()
            .map(|(w, t)| (w.len() + t.len()) as u64)
            .sum();
        assert_eq!(dict.bytes(), expected);
    }

    #[test]
    fn parses_comments_crlf_case_and_duplicates() {
        let text = "# comment\r\n\nHello\tsalve\r\nWORLD\tmundus\nhello\tave\n";
        let dict = Dictionary::read_from(text.as_bytes(), Path::new("t")).unwrap();
        assert_eq!(dict.len(), 2);
        assert_eq!(dict.get("hello"), Some("ave"));
        assert_eq!(dict.get("world"), Some("mundus"));
        assert_eq!(dict.get("Hello"), None);
        assert_eq!(dict.bytes(), ("hello".len() + 3 + "world".len() + 6) as u64);
    }

    #[test]
    fn malformed_lines_name_the_line() {
        for (text, line) in [
            (&b"a\tb\nno-tab\n"[..], 2),
            (b"\tx\n", 1),
            (b"x\t\n", 1),
            (b"a\tb\tc\n", 1),
            (b"a\tb\n\xff\tc\n", 2),
        ] {
            let err = Dictionary::read_from(text, Path::new("d.tsv")).unwrap_err();
            match err {
                LoadDictError::Malformed { line: l, .. } => assert_eq!(l, line, "{text:?}"),
                other => panic!("{other}"),
            }
        }
    }

    #[test]
    fn missing_file_is_reported_when_opening() {
        assert!(matches!(
            open_dictionary(Path::new("/nonexistent/dict.tsv")),
            Err(LoadDictError::Io { .. })
        ));
    }
}
