//! `tenantgate fmt DIR [--check]`: formats every `.cedar` file under
//! `DIR/tenants` in the style of `cedar-policy-formatter` (80 columns, two
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

/// Formats (or, with `check`, checks) the Cedar files of the tree at `dir`.
pub fn run(dir: &Path, check: bool) -> Result<ExitCode, String> {
    let tenants = dir.join("tenants");
    if !tenants.is_dir() {
        return Err(format!(
            "{}: error: not a policy folder (no `tenants/` folder)",
            dir.display()
        ));
    }
    let mut files = Vec::new();
    cedar_files(&tenants, &mut files)?;
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
        if check {
            println!("{}", path.display());
        } else {
            std::fs::write(path, formatted)
                .map_err(|e| format!("{}: error: cannot write: {e}", path.display()))?;
            println!("formatted {}", path.display());
        }
    }
    Ok(if check && !changed.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
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
