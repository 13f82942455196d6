//! The BENCHMARKS.md sections the benchmark subcommands (`pause`, `migrate`, `annotate`) own:
//! each lives between its own begin/end markers and is rewritten in place, leaving the rest of
//! the file byte for byte.

use std::path::Path;

use crate::compare::CompareError;

/// `doc` with the section (which starts with `begin` and ends with `end`) replaced between its
/// markers or, the first time, inserted before the first line starting with `before` (else at
/// the end). The rest of `doc` is kept byte for byte.
pub fn replace(doc: &str, section: &str, begin: &str, end: &str, before: Option<&str>) -> String {
    let body = section.trim_start_matches('\n');
    if let (Some(b), Some(e)) = (doc.find(begin), doc.find(end)) {
        if b < e {
            let mut stop = e + end.len();
            if doc[stop..].starts_with('\n') {
                stop += 1;
            }
            return format!("{}{body}{}", &doc[..b], &doc[stop..]);
        }
    }
    let lead = if section.starts_with('\n') { "" } else { "\n" };
    let at = before.and_then(|h| doc.find(&format!("\n{h}")));
    match at {
        Some(i) => format!("{}{lead}{section}{}", &doc[..i], &doc[i..]),
        None => {
            let sep = if doc.is_empty() || doc.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            format!("{doc}{sep}{lead}{section}")
        }
    }
}

/// Rewrites the section of the Markdown file `path` (created if missing); see [`replace`].
pub fn write(
    path: &Path,
    section: &str,
    begin: &str,
    end: &str,
    before: Option<&str>,
) -> Result<(), CompareError> {
    let doc = match std::fs::read_to_string(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(CompareError::Io {
                what: format!("read {}", path.display()),
                source,
            })
        }
    };
    std::fs::write(path, replace(&doc, section, begin, end, before)).map_err(|source| {
        CompareError::Io {
            what: format!("write {}", path.display()),
            source,
        }
    })
}
