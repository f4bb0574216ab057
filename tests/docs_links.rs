//! Every relative link between the project's Markdown documents resolves: the
//! file (or folder) it names exists, and the `#anchor` it names is a heading of
//! that file, as GitHub renders it. The README is the front door and the rest of
//! the documentation hangs off it, so a moved section must not strand a link.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Markdown files of the repository, outside build output and dependencies.
fn documents() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read a directory").flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if !matches!(name.as_ref(), "target" | ".git" | "node_modules" | "corpus") {
                    walk(&path, found);
                }
            } else if name.ends_with(".md") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new(ROOT), &mut found);
    found.sort();
    found
}

/// The lines of `text` outside fenced code blocks.
fn prose(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fenced = false;
    text.lines().enumerate().filter(move |(_, line)| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// `line` without its inline code spans, where brackets are not links.
fn without_code(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join("")
}

/// The targets of the inline links `[text](target)` on one line.
fn links(line: &str) -> Vec<String> {
    let line = without_code(line);
    let mut targets = Vec::new();
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        targets.push(after[..end].trim().to_owned());
        rest = &after[end..];
    }
    targets
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (but `-` and
/// `_`), spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .replace('`', "")
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a document's headings, with GitHub's `-1`, `-2` for repeats.
fn anchors(text: &str) -> HashSet<String> {
    let mut anchors = HashSet::new();
    for (_, line) in prose(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = slug(heading.trim());
        let mut anchor = base.clone();
        let mut n = 0;
        while !anchors.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
    }
    anchors
}

fn external(target: &str) -> bool {
    target.contains("://") || target.starts_with("mailto:")
}

#[test]
fn every_relative_link_and_anchor_between_the_documents_resolves() {
    let documents = documents();
    assert!(
        documents.iter().any(|path| path.ends_with("README.md")),
        "no README.md found under {ROOT}"
    );
    let mut broken = Vec::new();
    let mut checked = 0;
    for document in &documents {
        let text = std::fs::read_to_string(document).expect("read a document");
        for (number, line) in prose(&text) {
            for target in links(line) {
                if external(&target) {
                    continue;
                }
                checked += 1;
                let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
                let path = if file.is_empty() {
                    document.clone()
                } else {
                    document.parent().expect("a folder").join(file)
                };
                let at = format!(
                    "{}:{}: {target}",
                    document.strip_prefix(ROOT).unwrap_or(document).display(),
                    number + 1
                );
                if !path.exists() {
                    broken.push(format!("{at}: no such file"));
                } else if !anchor.is_empty() {
                    let linked = std::fs::read_to_string(&path).unwrap_or_default();
                    if !anchors(&linked).contains(anchor) {
                        broken.push(format!("{at}: no heading with that anchor"));
                    }
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} relative links found: is the scan right?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_follow_githubs_rules() {
    let page = "# Title\n## PostgreSQL: two roles\n## Outside `src/`\n## Low load (2026-12-02)\n## Title\n```\n# not a heading\n```\n";
    let found = anchors(page);
    for anchor in [
        "title",
        "postgresql-two-roles",
        "outside-src",
        "low-load-2026-12-02",
        "title-1",
    ] {
        assert!(found.contains(anchor), "{anchor} missing from {found:?}");
    }
    assert!(!found.contains("not-a-heading"));
    assert_eq!(links("see [a](b.md#c) and `[x](y)`"), ["b.md#c"]);
}
