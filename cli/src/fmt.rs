//! `tenantgate fmt DIR|FILE [--check] [--diff]`: formats every `.cedar` file
//! under `DIR/tenants` (or the one FILE) in the style of `cedar-policy-formatter` (80 columns, two
//! spaces of indentation).
//!
//! Without `--check` each file that changes is rewritten in place and named on
//! standard output. With `--check` nothing is written: each file that would
//! change is named, and the exit status is 1 if there is one. A file that does
//! not parse is an error at its file, line and column (exit 1), and no file is
//! written. Comments are kept: a file whose formatted text would not hold
//! every comment of the original, in order, is an error and is left as it is.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use cedar_policy_formatter::{policies_str_to_pretty, Config};
use tenantgate_engine::Diagnostic;

/// Formats (or, with `check`, checks; with `diff`, shows) the Cedar files of
/// the tree at `dir`, or the one `.cedar` file `dir` names.
pub fn run(dir: &Path, check: bool, diff: bool) -> Result<ExitCode, String> {
    let mut files = Vec::new();
    if dir.is_file() && dir.extension().is_some_and(|x| x == "cedar") {
        files.push(dir.to_path_buf());
    } else {
        let tenants = dir.join("tenants");
        if !tenants.is_dir() {
            return Err(format!(
                "{}: error: not a policy folder (no `tenants/` folder) or a `.cedar` file",
                dir.display()
            ));
        }
        cedar_files(&tenants, &mut files)?;
    }
    let config = Config::default();
    let mut errors = Vec::new();
    let mut changed = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: error: cannot read: {e}", path.display()))?;
        match format_text(&path.display().to_string(), &text, &config) {
            Ok(formatted) if formatted != text => changed.push((path, formatted)),
            Ok(_) => {}
            Err(mut ds) => errors.append(&mut ds),
        }
    }
    if !errors.is_empty() {
        let mut lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let n = errors.len();
        lines.push(format!("{n} error{}", if n == 1 { "" } else { "s" }));
        return Err(lines.join("\n"));
    }
    for (path, formatted) in &changed {
        if diff {
            let old = std::fs::read_to_string(path).unwrap_or_default();
            print!("{}", unified(&path.display().to_string(), &old, formatted));
        } else if check {
            println!("{}", path.display());
        } else {
            std::fs::write(path, formatted)
                .map_err(|e| format!("{}: error: cannot write: {e}", path.display()))?;
            println!("formatted {}", path.display());
        }
    }
    Ok(if (check || diff) && !changed.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// A unified diff (3 lines of context) from `old` to `new`, headed by `file`.
pub fn unified(file: &str, old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // Longest common subsequence table, from the end.
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            let v = if a.get(i) == b.get(j) {
                lcs.get(i + 1)
                    .and_then(|r| r.get(j + 1))
                    .copied()
                    .unwrap_or(0)
                    + 1
            } else {
                let down = lcs.get(i + 1).and_then(|r| r.get(j)).copied().unwrap_or(0);
                let right = lcs.get(i).and_then(|r| r.get(j + 1)).copied().unwrap_or(0);
                down.max(right)
            };
            if let Some(cell) = lcs.get_mut(i).and_then(|r| r.get_mut(j)) {
                *cell = v;
            }
        }
    }
    // The edit script: (tag, old line index, new line index, text).
    let mut ops: Vec<(char, usize, usize, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    let at = |i: usize, j: usize| lcs.get(i).and_then(|r| r.get(j)).copied().unwrap_or(0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                ops.push((' ', i, j, x));
                i += 1;
                j += 1;
            }
            (Some(x), Some(_)) if at(i + 1, j) >= at(i, j + 1) => {
                ops.push(('-', i, j, x));
                i += 1;
            }
            (_, Some(y)) => {
                ops.push(('+', i, j, y));
                j += 1;
            }
            (Some(x), None) => {
                ops.push(('-', i, j, x));
                i += 1;
            }
            (None, None) => break,
        }
    }
    let mut out = format!("--- {file}\n+++ {file} (formatted)\n");
    let changed: Vec<usize> = (0..ops.len())
        .filter(|k| ops.get(*k).is_some_and(|o| o.0 != ' '))
        .collect();
    let mut k = 0;
    while let Some(&first) = changed.get(k) {
        // A hunk: changes closer than 7 lines apart, with 3 lines of context.
        let mut last = first;
        while let Some(&next) = changed.get(k + 1) {
            if next - last > 6 {
                break;
            }
            last = next;
            k += 1;
        }
        k += 1;
        let from = first.saturating_sub(3);
        let to = (last + 4).min(ops.len());
        let hunk = ops.get(from..to).unwrap_or_default();
        let (oi, nj) = hunk.first().map(|o| (o.1, o.2)).unwrap_or((0, 0));
        let olen = hunk.iter().filter(|o| o.0 != '+').count();
        let nlen = hunk.iter().filter(|o| o.0 != '-').count();
        out.push_str(&format!("@@ -{},{olen} +{},{nlen} @@\n", oi + 1, nj + 1));
        for (tag, _, _, text) in hunk {
            out.push_str(&format!("{tag}{text}\n"));
        }
    }
    out
}

/// Every `.cedar` file under `dir`, sorted by path.
fn cedar_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: error: cannot read folder: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            cedar_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "cedar") {
            out.push(p);
        }
    }
    Ok(())
}

/// The formatted text of one file, or why it cannot be formatted (located
/// where the source is known).
pub fn format_text(file: &str, text: &str, config: &Config) -> Result<String, Vec<Diagnostic>> {
    // The formatter's own parse error carries no location we can use; Cedar's
    // parser says where the problem is.
    if let Err(e) = cedar_policy::PolicySet::from_str(text) {
        return Err(located(file, text, &e));
    }
    let formatted = policies_str_to_pretty(text, config)
        .map_err(|e| vec![Diagnostic::new(file, format!("cannot format: {e}"))])?;
    if comments(&formatted) != comments(text) {
        return Err(vec![Diagnostic::new(
            file,
            "cannot format: the formatter would drop or reorder a comment; the file is left as it is",
        )]);
    }
    Ok(formatted)
}

/// One diagnostic per Cedar error, at its first label.
fn located(file: &str, text: &str, e: &dyn miette::Diagnostic) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if let Some(related) = e.related() {
        for r in related {
            out.extend(located(file, text, r));
        }
        if !out.is_empty() {
            return out;
        }
    }
    let mut message = e.to_string();
    if let Some(help) = e.help() {
        message = format!("{message} (help: {help})");
    }
    match e.labels().and_then(|mut l| l.next()) {
        Some(label) => out.push(Diagnostic::at_offset(file, text, label.offset(), message)),
        None => out.push(Diagnostic::new(file, message)),
    }
    out
}

/// The text of every `//` comment, in order, trailing spaces trimmed. Cedar
/// has no other comments; `//` inside a string literal is not one.
fn comments(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut in_string = false;
    while let Some(&b) = bytes.get(i) {
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if b == b'/' && bytes.get(i + 1) == Some(&b'/') {
            let end = text
                .get(i..)
                .and_then(|rest| rest.find('\n'))
                .map_or(text.len(), |n| i + n);
            out.push(text.get(i..end).unwrap_or_default().trim_end());
            i = end;
            continue;
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_found_outside_strings_only() {
        let text = "// a\npermit (principal, action, resource) // b  \nwhen { resource.path == \"//x\\\"//y\" }; // c";
        assert_eq!(comments(text), vec!["// a", "// b", "// c"]);
    }

    #[test]
    fn formats_and_keeps_comments() {
        let text = "// keep me\n@id(\"x\")\npermit(principal,action,resource) // and me\nwhen {context.method==\"GET\"};\n";
        let out = format_text("t.cedar", text, &Config::default()).unwrap();
        assert_eq!(
            out,
            "// keep me\n@id(\"x\")\npermit (principal, action, resource) // and me\nwhen { context.method == \"GET\" };\n"
        );
        assert_eq!(
            format_text("t.cedar", &out, &Config::default()).unwrap(),
            out
        );
    }

    #[test]
    fn a_syntax_error_is_located() {
        let text = "permit (principal, action, resource)\nwhen { context.method == };\n";
        let err = format_text("t.cedar", text, &Config::default()).unwrap_err();
        assert_eq!(
            (err[0].file.as_str(), err[0].line),
            ("t.cedar", 2),
            "{err:?}"
        );
        assert!(err[0].column > 0, "{err:?}");
    }
}
