//! `tenantgate fmt DIR [--check]` on a small tree in a temporary folder.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
use common::*;

use std::path::Path;

const UNFORMATTED: &str = "// Members read.\n@id(\"members-read\")\npermit(principal,action in Action::\"read\",resource)   // any path\nwhen {resource in principal.tenant};\n";

const FORMATTED: &str = "// Members read.\n@id(\"members-read\")\npermit (\n  principal,\n  action in Action::\"read\",\n  resource\n) // any path\nwhen { resource in principal.tenant };\n";

/// `tenants/` with one formatted file at the root and `acme/p.cedar` holding `acme`.
fn tree(acme: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tenants");
    std::fs::create_dir_all(root.join("acme")).unwrap();
    std::fs::write(root.join("root.cedar"), FORMATTED).unwrap();
    std::fs::write(root.join("acme/p.cedar"), acme).unwrap();
    // Not a Cedar file: never touched.
    std::fs::write(root.join("acme/notes.txt"), "permit(  )").unwrap();
    dir
}

fn fmt(dir: &Path, check: bool) -> Run {
    let d = dir.to_str().unwrap();
    if check {
        tenantgate(&["fmt", d, "--check"])
    } else {
        tenantgate(&["fmt", d])
    }
}

#[test]
fn check_fails_on_an_unformatted_file_and_passes_after_fmt() {
    let dir = tree(UNFORMATTED);
    let acme = dir.path().join("tenants/acme/p.cedar");

    let r = fmt(dir.path(), true);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, format!("{}\n", acme.display()));
    assert_eq!(std::fs::read_to_string(&acme).unwrap(), UNFORMATTED);

    let r = fmt(dir.path(), false);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, format!("formatted {}\n", acme.display()));
    assert_eq!(std::fs::read_to_string(&acme).unwrap(), FORMATTED);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tenants/acme/notes.txt")).unwrap(),
        "permit(  )"
    );

    let r = fmt(dir.path(), true);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);
}

#[test]
fn a_syntax_error_names_file_line_and_column() {
    let broken = "@id(\"a\")\npermit (principal, action, resource)\nwhen { resource.path == };\n";
    let dir = tree(broken);
    for check in [true, false] {
        let r = fmt(dir.path(), check);
        assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
        assert_eq!(r.stdout, "");
        let first = r.stderr.lines().next().unwrap();
        let want = format!(
            "{}:3:25: error: unexpected token `}}`",
            dir.path().join("tenants/acme/p.cedar").display()
        );
        assert!(first.starts_with(&want), "{first}");
        assert_eq!(r.stderr.lines().last(), Some("1 error"));
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tenants/acme/p.cedar")).unwrap(),
        broken
    );
}

#[test]
fn a_folder_without_tenants_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = fmt(dir.path(), true);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        format!(
            "{}: error: not a policy folder (no `tenants/` folder) or a `.cedar` file\n",
            dir.path().display()
        )
    );
}
