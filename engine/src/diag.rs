//! Located diagnostics: every configuration error names a file and, where the
//! source text is known, a line and column.

use std::fmt;

/// One error in a policy tree or bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// File relative to the policy folder (`tenants/acme/base.cedar`), or
    /// `bundle` for problems with the bundle document itself.
    pub file: String,
    /// 1-based line; 0 when unknown.
    pub line: u32,
    /// 1-based column (in characters); 0 when unknown.
    pub column: u32,
    pub message: String,
    /// `error` unless built with [`Diagnostic::warning`] or [`Diagnostic::note`].
    #[serde(skip_serializing_if = "Severity::is_error")]
    pub severity: Severity,
}

/// How bad a [`Diagnostic`] is (docs/reference.md, "Warnings and notes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The folder or bundle does not load.
    #[default]
    Error,
    /// Almost certainly a mistake (a file that is not read, a setting that
    /// names nothing); it loads, and `--strict` refuses it.
    Warning,
    /// Worth knowing, often deliberate (no schema); never refused.
    Note,
}

impl Severity {
    pub fn is_error(&self) -> bool {
        *self == Severity::Error
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        })
    }
}

impl Diagnostic {
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.into(),
            line: 0,
            column: 0,
            message: message.into(),
            severity: Severity::Error,
        }
    }

    /// A warning about a whole file (see [`Severity::Warning`]).
    pub fn warning(file: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::new(file, message)
        }
    }

    /// A note about a whole file (see [`Severity::Note`]).
    pub fn note(file: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Note,
            ..Diagnostic::new(file, message)
        }
    }

    /// A diagnostic at byte `offset` of `text`.
    pub fn at_offset(
        file: impl Into<String>,
        text: &str,
        offset: usize,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = line_col(text, offset);
        Diagnostic {
            line,
            column,
            ..Diagnostic::new(file, message)
        }
    }

    pub fn at(file: impl Into<String>, line: u32, column: u32, message: impl Into<String>) -> Self {
        Diagnostic {
            line,
            column,
            ..Diagnostic::new(file, message)
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, self.line, self.column, self.severity, self.message
            )
        } else {
            write!(f, "{}: {}: {}", self.file, self.severity, self.message)
        }
    }
}

/// All errors found while loading; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn one(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Diagnostics::one(d)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(column).unwrap_or(u32::MAX),
    )
}

/// Byte offset of the first character of 1-based `line`/`column`.
#[cfg(test)]
pub fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut offset = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            return offset
                + l.char_indices()
                    .nth(column.saturating_sub(1))
                    .map(|(b, _)| b)
                    .unwrap_or(l.len());
        }
        offset += l.len();
    }
    offset
}

/// Finds where a JSON key path (`["limits", "rps", "rate"]`) appears in `text`,
/// by scanning for each quoted key in turn. Good enough to point an author at
/// the right line; falls back to the last key found.
pub fn locate_json_key(text: &str, keys: &[&str]) -> Option<usize> {
    let mut from = 0;
    let mut found = None;
    for key in keys {
        let needle = format!("{}:", serde_json::to_string(key).ok()?);
        let needle_spaced = format!("{} :", serde_json::to_string(key).ok()?);
        let rest = text.get(from..)?;
        let hit = rest.find(&needle).or_else(|| rest.find(&needle_spaced));
        match hit {
            Some(i) => {
                from += i;
                found = Some(from);
            }
            None => break,
        }
    }
    found
}

/// A located error for every key that appears twice in one object of a JSON
/// file: serde keeps the last value and drops the first without a word.
pub fn duplicate_key_errors(file: &str, text: &str) -> Vec<Diagnostic> {
    duplicate_json_keys(text)
        .into_iter()
        .map(|(offset, path, key)| {
            let within = if path.is_empty() {
                String::new()
            } else {
                format!(" in `{}`", path.join("."))
            };
            Diagnostic::at_offset(
                file,
                text,
                offset,
                format!("key `{key}` appears twice{within}; only the last would count, so the first would be silently lost"),
            )
        })
        .collect()
}

/// A settings message that starts with a backticked key path
/// (`` `tenant.header`: ... ``), located at that key when the text has it.
pub fn locate_setting(file: &str, text: &str, message: String) -> Diagnostic {
    let key = message
        .strip_prefix('`')
        .and_then(|rest| rest.split_once('`'))
        .map(|(k, _)| k.to_string());
    let offset = key.and_then(|k| {
        let parts: Vec<&str> = k.split('.').collect();
        (1..=parts.len())
            .rev()
            .find_map(|n| locate_json_key(text, parts.get(..n).unwrap_or_default()))
    });
    match offset {
        Some(off) => Diagnostic::at_offset(file, text, off, message),
        None => Diagnostic::new(file, message),
    }
}

/// Keys that appear twice in one JSON object of `text` (serde keeps the last
/// one silently): each with the offset of its second occurrence and the path
/// of the object holding it. `text` should be valid JSON; anything the scan
/// does not understand ends it early.
pub fn duplicate_json_keys(text: &str) -> Vec<(usize, Vec<String>, String)> {
    let mut scan = JsonScan {
        b: text.as_bytes(),
        text,
        i: 0,
        out: Vec::new(),
    };
    let mut path = Vec::new();
    scan.value(&mut path, 0);
    scan.out
}

struct JsonScan<'a> {
    b: &'a [u8],
    text: &'a str,
    i: usize,
    out: Vec<(usize, Vec<String>, String)>,
}

impl JsonScan<'_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    /// A string starting at `self.i` (a `"`): its decoded value.
    fn string(&mut self) -> Option<String> {
        let start = self.i;
        self.i += 1;
        while let Some(&c) = self.b.get(self.i) {
            self.i += 1;
            match c {
                b'\\' => self.i += 1,
                b'"' => {
                    let raw = self.text.get(start..self.i)?;
                    return serde_json::from_str(raw).ok();
                }
                _ => {}
            }
        }
        None
    }

    fn value(&mut self, path: &mut Vec<String>, depth: usize) -> Option<()> {
        if depth > 128 {
            return None;
        }
        self.ws();
        match self.b.get(self.i)? {
            b'{' => {
                self.i += 1;
                let mut seen = std::collections::HashSet::new();
                loop {
                    self.ws();
                    match self.b.get(self.i)? {
                        b'}' => {
                            self.i += 1;
                            return Some(());
                        }
                        b',' => self.i += 1,
                        b'"' => {
                            let at = self.i;
                            let key = self.string()?;
                            if !seen.insert(key.clone()) {
                                self.out.push((at, path.clone(), key.clone()));
                            }
                            self.ws();
                            if self.b.get(self.i) != Some(&b':') {
                                return None;
                            }
                            self.i += 1;
                            path.push(key);
                            let r = self.value(path, depth + 1);
                            path.pop();
                            r?;
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.i += 1;
                loop {
                    self.ws();
                    match self.b.get(self.i)? {
                        b']' => {
                            self.i += 1;
                            return Some(());
                        }
                        b',' => self.i += 1,
                        _ => self.value(path, depth + 1)?,
                    }
                }
            }
            b'"' => self.string().map(|_| ()),
            _ => {
                while self
                    .b
                    .get(self.i)
                    .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
                {
                    self.i += 1;
                }
                Some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let t = "ab\ncé d\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 6), (2, 3));
        assert_eq!(offset_of(t, 2, 3), 6);
    }

    #[test]
    fn finds_json_keys() {
        let t = "{\n  \"limits\": {\n    \"rps\": { \"rate\": 0 }\n  }\n}";
        let off = locate_json_key(t, &["limits", "rps", "rate"]).unwrap();
        assert_eq!(line_col(t, off), (3, 14));
    }

    #[test]
    fn display_has_location() {
        let d = Diagnostic::at("tenants/a.cedar", 3, 7, "unexpected token");
        assert_eq!(
            d.to_string(),
            "tenants/a.cedar:3:7: error: unexpected token"
        );
    }

    #[test]
    fn keys_written_twice_are_found_with_their_object() {
        let text = "{\"a\": 1, \"l\": {\"x\": {}, \"y\": [1, {\"k\": 1, \"k\": 2}], \"x\": 2}, \"a\": \"}\"}";
        let found = duplicate_json_keys(text);
        let keys: Vec<(Vec<String>, String)> = found
            .iter()
            .map(|(_, p, k)| (p.clone(), k.clone()))
            .collect();
        assert_eq!(
            keys,
            [
                (vec!["l".to_string(), "y".to_string()], "k".to_string()),
                (vec!["l".to_string()], "x".to_string()),
                (vec![], "a".to_string()),
            ]
        );
        assert_eq!(&text[found[2].0..found[2].0 + 3], "\"a\"");
        assert!(duplicate_json_keys("{\"a\\\"b\": 1, \"a\\\"b\": 2}").len() == 1);
        assert!(duplicate_json_keys("{\"a\": 1, \"b\": 2}").is_empty());
    }
}
