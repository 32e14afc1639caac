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
}

impl Diagnostic {
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.into(),
            line: 0,
            column: 0,
            message: message.into(),
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
            file: file.into(),
            line,
            column,
            message: message.into(),
        }
    }

    pub fn at(file: impl Into<String>, line: u32, column: u32, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.into(),
            line,
            column,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: error: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(f, "{}: error: {}", self.file, self.message)
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
}
