//! Names: the one mapping from an OTel metric name plus its remaining data point attributes to a
//! TensorBoard tag and an MLflow metric key, and the rules that make a run name safe as a directory.
//!
//! # Series name (shared by both exporters)
//! `[prefix/]<metric name>[/<key>=<value>]...` with the attributes (the step attribute already
//! removed) sorted by key. Example: `eval.accuracy` with `split=val` → `eval.accuracy/split=val`.
//! TensorBoard uses the series name as its tag unchanged (TensorBoard accepts any UTF-8 tag).
//! A series name (or metric name) longer than [`MAX_SERIES_NAME_BYTES`] bytes keeps its first
//! bytes up to a character boundary, followed by `~` and 16 hex digits of the 64-bit FNV-1a hash
//! of the whole name ([`bounded_name`]): one metric name is shared by every data point of its
//! metric in OTLP, so without a bound a 64 MiB name would be copied once per data point.
//!
//! # MLflow keys
//! MLflow's server accepts keys matching `^[/\w.\- :]*$` (Python `re`, Unicode `\w`), that are
//! already normalized paths (`posixpath.normpath(k) == k`, not `.`, no leading `/` or `..`) and at
//! most 250 characters (source: `mlflow/utils/validation.py`, mlflow 3.17). [`mlflow_key`] maps any
//! series name to such a key, deterministically:
//! 1. every character that is not an ASCII letter or digit, `_`, `-`, `.`, ` `, `:`, `/`, or a
//!    Unicode letter or number (general categories L* and N*) assigned by Unicode 13.0 (what the
//!    server's Python knows at the oldest; see [`mlflow_key`]), becomes `_`;
//! 2. the name is split on `/`; empty segments are removed, a segment `.` becomes `_` and a
//!    segment `..` becomes `__`; segments are joined with `/` again; an empty result is `_`; a
//!    leading `..` becomes `__` (the server refuses every name whose normalized path starts with
//!    `..`, `..x` included: `path_not_unique`);
//! 3. a key longer than 250 characters keeps its first 241 characters (trailing `/` removed)
//!    followed by `-` and 8 hex digits of the FNV-1a hash of the original name.
//!
//! Two different names can map to the same key (`acc@1` and `acc#1` both give `acc_1`). Within a
//! run, [`MlflowKeys`] gives the key to the first name that claims it and, to every later name that
//! collides, the key with `-` and 8 hex digits of that name's hash appended (shortened first, so
//! the result still fits 250 characters). The hash depends only on the name, so the mapping does
//! not depend on arrival order beyond who claims the plain key first.

use std::collections::HashMap;

use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

/// MLflow's maximum metric, param and tag key length, in Unicode code points
/// (source: `mlflow/utils/validation.py`, `MAX_ENTITY_KEY_LENGTH`).
pub const MLFLOW_MAX_KEY_CHARS: usize = 250;

/// Longest series or metric name kept whole, in bytes (see the module docs).
pub const MAX_SERIES_NAME_BYTES: usize = 1024;

/// 64-bit FNV-1a of `s` (not for security).
pub fn fnv1a64(s: &str) -> u64 {
    fnv1a64_bytes(s.bytes())
}

/// 64-bit FNV-1a of a byte sequence (names here, MLflow's hashed run-key tag).
pub fn fnv1a64_bytes(bytes: impl IntoIterator<Item = u8>) -> u64 {
    fnv1a(bytes, 0xcbf2_9ce4_8422_2325, 0x0100_0000_01b3)
}

/// The one FNV-1a loop of the crate (parameters from the FNV spec, draft-eastlake-fnv). The
/// 32-bit variant runs it in 64 bits and keeps the low 32: the low bits of a product depend only
/// on the low bits of its factors, so the result is FNV-1a 32's.
fn fnv1a(bytes: impl IntoIterator<Item = u8>, offset_basis: u64, prime: u64) -> u64 {
    let mut h = offset_basis;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(prime);
    }
    h
}

/// Cuts a name longer than [`MAX_SERIES_NAME_BYTES`] to exactly that many bytes or fewer: the
/// longest prefix on a character boundary that leaves room for `~` and 16 hex digits of
/// [`fnv1a64`] of the whole name. Shorter names are returned unchanged.
pub fn bounded_name(name: &str) -> std::borrow::Cow<'_, str> {
    if name.len() <= MAX_SERIES_NAME_BYTES {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut cut = MAX_SERIES_NAME_BYTES - 17;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    std::borrow::Cow::Owned(format!("{}~{:016x}", &name[..cut], fnv1a64(name)))
}

/// Builds the series name shared by both exporters: `[prefix/]name[/k=v...]`, attributes sorted by
/// key (callers pass them in any order). An empty prefix is the same as none. The result is at
/// most [`MAX_SERIES_NAME_BYTES`] bytes ([`bounded_name`]).
pub fn series_name(prefix: Option<&str>, name: &str, attributes: &[(String, String)]) -> String {
    let out = match prefix.filter(|p| !p.is_empty()) {
        Some(p) => format!("{}/{}", p.trim_end_matches('/'), unbounded_series_name(name, attributes)),
        None => unbounded_series_name(name, attributes),
    };
    match bounded_name(&out) {
        std::borrow::Cow::Borrowed(_) => out,
        std::borrow::Cow::Owned(cut) => cut,
    }
}

/// `name[/k=v...]`, attributes sorted by key: [`series_name`] without prefix and before
/// bounding (the decoder keeps it so each exporter can add its own prefix, then bound).
pub fn unbounded_series_name(name: &str, attributes: &[(String, String)]) -> String {
    let mut attrs: Vec<&(String, String)> = attributes.iter().collect();
    attrs.sort();
    let mut out = String::with_capacity(name.len() + 16);
    out.push_str(name);
    for (k, v) in attrs {
        out.push('/');
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Whether a metric name stands for nothing: empty, or only `/` and white space. TensorBoard
/// would show an empty tag and MLflow's key rules (above) would leave an empty key (written
/// `_`), so such names are refused (`invalid_name`) rather than merged into one series.
pub fn maps_to_nothing(name: &str) -> bool {
    name.chars().all(|c| c == '/' || c.is_whitespace())
}

/// 32-bit FNV-1a of `s`: a stable, dependency-free hash for name suffixes (not for security).
pub fn fnv1a32(s: &str) -> u32 {
    fnv1a(s.bytes(), 0x811c_9dc5, 0x0100_0193) as u32
}

/// Non-ASCII characters MLflow's server accepts in keys, as sorted inclusive ranges: letters and
/// numbers (general categories L* and N*) assigned by Unicode 13.0. The server checks with
/// Python's `re` `\w`, which knows only the Unicode version of the server's Python: 13.0 for
/// Python 3.10, the oldest MLflow 3 runs on. A letter added later (e.g. U+13926, Unicode 16) is
/// rejected by such a server with HTTP 400, so it is mapped to `_` like any other character.
static MLFLOW_WORD_CHARS: std::sync::LazyLock<Vec<(char, char)>> = std::sync::LazyLock::new(|| {
    use regex_syntax::hir::{Class, HirKind};
    match regex_syntax::Parser::new().parse(r"[\p{L}\p{N}&&\p{Age:13.0}]").map(|h| h.into_kind()) {
        Ok(HirKind::Class(Class::Unicode(c))) => c.ranges().iter().map(|r| (r.start(), r.end())).collect(),
        // The pattern is a constant that parses; should it not, only ASCII is allowed (safe).
        _ => Vec::new(),
    }
});

fn mlflow_char_allowed(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ' | ':' | '/');
    }
    // Python's `\w` on str matches letters and numbers; marks (M*) are not word characters there,
    // so a combining accent would be rejected by the server even though Rust calls it alphabetic.
    MLFLOW_WORD_CHARS
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Maps a series name to a valid MLflow key by the rules in the module docs (steps 1–3). Pure and
/// deterministic; the result is never empty and is at most [`MLFLOW_MAX_KEY_CHARS`] characters.
pub fn mlflow_key(name: &str) -> String {
    let replaced: String = name
        .chars()
        .map(|c| if mlflow_char_allowed(c) { c } else { '_' })
        .collect();
    let segments: Vec<&str> = replaced
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| match s {
            "." => "_",
            ".." => "__",
            other => other,
        })
        .collect();
    let mut joined = if segments.is_empty() {
        "_".to_string()
    } else {
        segments.join("/")
    };
    if joined.starts_with("..") {
        // MLflow refuses any name whose normalized path starts with `..` (`..x` too).
        joined.replace_range(..2, "__");
    }
    if joined.chars().count() <= MLFLOW_MAX_KEY_CHARS {
        return joined;
    }
    with_hash_suffix(&joined, fnv1a32(name))
}

/// Shortens `key` so that `key-xxxxxxxx` fits [`MLFLOW_MAX_KEY_CHARS`], then appends the suffix.
fn with_hash_suffix(key: &str, hash: u32) -> String {
    let keep = MLFLOW_MAX_KEY_CHARS - 9;
    let head: String = key.chars().take(keep).collect();
    // A cut can leave a trailing `/` or a final segment `.`/`..`, which MLflow's path rule rejects.
    let mut head = head.trim_end_matches('/').to_string();
    if head.ends_with("/..") || head.ends_with("/.") || head == "." || head == ".." {
        head = head.trim_end_matches('.').trim_end_matches('/').to_string();
    }
    if head.is_empty() {
        head.push('_');
    }
    format!("{head}-{hash:08x}")
}

/// One run's claims on MLflow keys, for collision handling (see the module docs).
#[derive(Debug, Default)]
pub struct MlflowKeys {
    by_name: HashMap<String, String>,
    claimed: HashMap<String, String>,
}

/// The MLflow key of one series name, and whether it differs from the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedKey {
    /// The key sent to MLflow.
    pub key: String,
    /// True when `key != name`: the original name must be recorded next to it.
    pub renamed: bool,
    /// True the first time this name was mapped in this run (callers write the name mapping once).
    pub first_use: bool,
}

impl MlflowKeys {
    /// Records that `name` already holds `key` in this run (read back from the server when a
    /// run is continued), so [`MlflowKeys::key_for`] gives it the same key and never gives that
    /// key to another name. Returns false, changing nothing, when `key` is held by another name
    /// or `name` by another key: the first claim read stands.
    pub fn restore(&mut self, name: &str, key: &str) -> bool {
        let key_free = self.claimed.get(key).is_none_or(|owner| owner == name);
        let name_free = self.by_name.get(name).is_none_or(|k| k == key);
        if !(key_free && name_free) {
            return false;
        }
        self.claimed.insert(key.to_string(), name.to_string());
        self.by_name.insert(name.to_string(), key.to_string());
        true
    }

    /// Returns the key for `name` in this run, claiming it on first use.
    pub fn key_for(&mut self, name: &str) -> MappedKey {
        if let Some(k) = self.by_name.get(name) {
            return MappedKey { key: k.clone(), renamed: k != name, first_use: false };
        }
        let base = mlflow_key(name);
        let key = match self.claimed.get(&base) {
            Some(owner) if owner != name => {
                let mut candidate = with_hash_suffix(&base, fnv1a32(name));
                // A second collision on the suffixed key is astronomically rare, but must still
                // never merge two series: rehash until free.
                let mut salt = 0u32;
                while self.claimed.get(&candidate).is_some_and(|o| o != name) {
                    salt += 1;
                    candidate = with_hash_suffix(&base, fnv1a32(&format!("{name}#{salt}")));
                }
                candidate
            }
            _ => base,
        };
        self.claimed.insert(key.clone(), name.to_string());
        self.by_name.insert(name.to_string(), key.clone());
        MappedKey { renamed: key != name, key, first_use: true }
    }
}

/// Longest MLflow run name we send, in code points: the `runs.name` column of MLflow's SQL schema
/// is `String(250)` (enforced by PostgreSQL and MySQL, not by SQLite).
pub const MLFLOW_MAX_RUN_NAME_CHARS: usize = 250;

/// Maps a run name to what the MLflow exporter sends as `run_name`: control characters
/// (including NUL, which PostgreSQL cannot store) become `_`, and the name is cut to
/// [`MLFLOW_MAX_RUN_NAME_CHARS`]. Run names need not be unique in MLflow; the run's identity
/// is kept in the tag `trainmetrics.run_key`.
pub fn mlflow_run_name(name: &str) -> String {
    name.chars().map(|c| if c.is_control() { '_' } else { c }).take(MLFLOW_MAX_RUN_NAME_CHARS).collect()
}

/// Longest run directory name we write, in bytes: well under the 255-byte limit of common file
/// systems, leaving room for the hash suffix.
const MAX_RUN_DIR_BYTES: usize = 200;

/// Maps a run name to a single, safe, readable directory name inside the logdir.
///
/// Rule: `%` and every character that is a path separator, a control character (including NUL),
/// or not printable is written as `%XX` per UTF-8 byte; a leading `.` is written `%2E` (so `.`,
/// `..` and hidden names cannot occur); an empty name becomes `%00`. This escaping is injective,
/// so distinct run names give distinct directories. A result longer than 200 bytes keeps its
/// first 180 bytes (on a character boundary) followed by `~` and 16 hex digits of two FNV-1a
/// hashes of the original name.
pub fn run_dir_name(run: &str) -> String {
    let mut out = String::with_capacity(run.len());
    for (i, c) in run.chars().enumerate() {
        let escape = c == '%'
            || c == '/'
            || c == '\\'
            || c.is_control()
            || (i == 0 && c == '.')
            || (!c.is_ascii() && !matches!(c.general_category_group(), GeneralCategoryGroup::Letter | GeneralCategoryGroup::Number));
        if escape {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    if out.len() <= MAX_RUN_DIR_BYTES {
        return out;
    }
    let mut cut = 180;
    while !out.is_char_boundary(cut) {
        cut -= 1;
    }
    let h1 = fnv1a32(run);
    let h2 = fnv1a32(&format!("{run}\u{1}"));
    format!("{}~{h1:08x}{h2:08x}", &out[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // draft-eastlake-fnv test vectors.
        assert_eq!([fnv1a32(""), fnv1a32("a"), fnv1a32("foobar")], [0x811c_9dc5, 0xe40c_292c, 0xbf9c_f968]);
        assert_eq!([fnv1a64(""), fnv1a64("a"), fnv1a64("foobar")], [0xcbf2_9ce4_8422_2325, 0xaf63_dc4c_8601_ec8c, 0x8594_4171_f739_67e8]);
    }

    /// The server-side rules of mlflow/utils/validation.py, restated to check our output.
    fn valid_for_mlflow(k: &str) -> bool {
        !k.is_empty()
            && k.chars().count() <= MLFLOW_MAX_KEY_CHARS
            && k.chars().all(mlflow_char_allowed)
            && !k.starts_with('/')
            && !k.ends_with('/')
            && !k.contains("//")
            && k.split('/').all(|s| s != "." && s != "..")
            && !k.starts_with("..")
    }

    #[test]
    fn letters_newer_than_unicode_13_are_replaced() {
        // U+13926 is a letter since Unicode 16; a server on Python 3.11 (Unicode 14) rejected it.
        assert_eq!(mlflow_key("nh/λ\u{13926}é"), "nh/λ_é");
        assert_eq!(mlflow_key("a\u{301}"), "a_", "combining marks are not word characters");
        assert_eq!(mlflow_key("数字٣"), "数字٣");
    }

    #[test]
    fn long_series_names_are_bounded_and_stay_distinct() {
        let long = "é".repeat(5000);
        let a = series_name(None, &long, &[]);
        let b = series_name(None, &long, &[("k".into(), "v".into())]);
        assert!(a.len() <= MAX_SERIES_NAME_BYTES && b.len() <= MAX_SERIES_NAME_BYTES);
        assert_ne!(a, b);
        assert!(a.starts_with("éé") && a.as_bytes()[a.len() - 17] == b'~', "{a}");
        assert_eq!(series_name(None, "x", &[]), "x");
        let exact = "x".repeat(MAX_SERIES_NAME_BYTES);
        assert_eq!(bounded_name(&exact), exact.as_str());
    }

    #[test]
    fn series_name_sorts_attributes_and_applies_prefix() {
        let attrs = vec![("split".to_string(), "val".to_string()), ("k".to_string(), "1".to_string())];
        assert_eq!(series_name(None, "eval.accuracy", &attrs), "eval.accuracy/k=1/split=val");
        assert_eq!(series_name(Some("exp/"), "loss", &[]), "exp/loss");
        assert_eq!(series_name(Some(""), "loss", &[]), "loss");
    }

    #[test]
    fn mlflow_key_maps_the_known_bad_names() {
        assert_eq!(mlflow_key("acc@1"), "acc_1");
        assert_eq!(mlflow_key("timing(s)/gen"), "timing_s_/gen");
        assert_eq!(mlflow_key("a,b"), "a_b");
        assert_eq!(mlflow_key("precision,recall"), "precision_recall");
        assert_eq!(mlflow_key("huber[delta=1.3]"), "huber_delta_1.3_");
        assert_eq!(mlflow_key("n:estimators"), "n:estimators");
        assert_eq!(mlflow_key("lossé"), "lossé");
        assert_eq!(mlflow_key("eval.accuracy/split=val"), "eval.accuracy/split_val");
        assert_eq!(mlflow_key(""), "_");
        assert_eq!(mlflow_key(".."), "__");
        assert_eq!(mlflow_key("/a//b/./c/"), "a/b/_/c");
        assert_eq!(mlflow_key("a/../b"), "a/__/b");
        assert_eq!(mlflow_key("..x/loss"), "__x/loss");
        assert_eq!(mlflow_key("/...."), "__..");
        // A combining mark is not `\w` in Python: replaced.
        assert_eq!(mlflow_key("e\u{301}"), "e_");
        for n in ["acc@1", "", "..", "/", "//", "./x", "x/.", "日本語/損失", "a\0b", "\u{1F600}", "..x", "/..x/"] {
            assert!(valid_for_mlflow(&mlflow_key(n)), "{n:?} -> {:?}", mlflow_key(n));
        }
    }

    #[test]
    fn long_names_are_cut_with_a_stable_hash() {
        let long = "x".repeat(300);
        let k = mlflow_key(&long);
        assert_eq!(k.chars().count(), 250);
        assert!(valid_for_mlflow(&k));
        assert_eq!(k, mlflow_key(&long));
        assert_ne!(k, mlflow_key(&"x".repeat(301)));
        // A cut right after a `/` must not leave a trailing slash.
        let slashy = format!("{}/{}", "a".repeat(240), "b".repeat(100));
        assert!(valid_for_mlflow(&mlflow_key(&slashy)));
        let unicode = "é".repeat(400);
        let k = mlflow_key(&unicode);
        assert_eq!(k.chars().count(), 250);
        assert!(valid_for_mlflow(&k));
    }

    #[test]
    fn collisions_get_distinct_keys() {
        let mut keys = MlflowKeys::default();
        let a = keys.key_for("acc@1");
        let b = keys.key_for("acc#1");
        let c = keys.key_for("acc_1");
        assert_eq!(a.key, "acc_1");
        assert!(a.renamed && a.first_use);
        assert_eq!(b.key, format!("acc_1-{:08x}", fnv1a32("acc#1")));
        assert_ne!(c.key, a.key);
        assert_ne!(c.key, b.key);
        assert!(!c.renamed || c.key != "acc_1");
        let again = keys.key_for("acc#1");
        assert_eq!(again.key, b.key);
        assert!(!again.first_use);
        // The plain name that claims its own key first keeps it unchanged.
        let mut keys = MlflowKeys::default();
        let plain = keys.key_for("loss");
        assert_eq!(plain, MappedKey { key: "loss".into(), renamed: false, first_use: true });
    }

    #[test]
    fn restored_claims_survive_a_new_arrival_order() {
        // Before a restart `a@b` claimed `a_b` and the name `a_b` got the suffixed key; after
        // it `a_b` arrives first and must not take the plain key back.
        let mut before = MlflowKeys::default();
        let ab = before.key_for("a@b").key;
        let plain = before.key_for("a_b").key;
        assert_eq!(ab, "a_b");
        assert_ne!(plain, "a_b");
        let mut after = MlflowKeys::default();
        assert!(after.restore("a@b", &ab));
        assert!(after.restore("a_b", &plain));
        assert!(!after.restore("other", &ab), "a key held by one name is not given to another");
        assert!(!after.restore("a@b", "elsewhere"), "a name keeps the key it had");
        let again = after.key_for("a_b");
        assert_eq!(again.key, plain);
        assert!(!again.first_use);
        assert_eq!(after.key_for("a@b").key, "a_b");
        assert_ne!(after.key_for("a#b").key, "a_b");
    }

    #[test]
    fn run_dir_names_stay_inside_and_are_distinct() {
        let names = [
            "../../etc/passwd",
            "/abs/path",
            "a\0b",
            "..",
            ".",
            "",
            "a%2Fb",
            "a/b",
            "ok-run_1",
            "résumé",
            &"r".repeat(300),
            &"r".repeat(301),
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let d = run_dir_name(n);
            assert!(!d.contains('/') && !d.contains('\\') && !d.contains('\0'), "{d}");
            assert!(d != "." && d != ".." && !d.starts_with('.'), "{d}");
            assert!(!d.is_empty() && d.len() <= MAX_RUN_DIR_BYTES, "{d}");
            assert!(seen.insert(d.clone()), "collision on {d}");
        }
        assert_eq!(run_dir_name("ok-run_1"), "ok-run_1");
        assert_eq!(run_dir_name("../../etc/passwd"), "%2E.%2F..%2Fetc%2Fpasswd");
        assert_eq!(run_dir_name("a\0b"), "a%00b");
        assert_eq!(run_dir_name("résumé"), "résumé");
    }
}
