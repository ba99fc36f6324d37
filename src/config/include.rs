//! `[[include]]` (issue 16; an addition to CONFIG.md, docs/configuration.md):
//! the main file names directories of customer files, each bound to a
//! reseller, or to the admin when `reseller` is omitted:
//!
//! ```toml
//! [[include]]
//! path = "/etc/tollgate/resellers.d/acme/*.toml"
//! reseller = "acme"
//! ```
//!
//! An included file holds only `[[customer]]` and `[[client]]` tables.
//! [`assemble`] reads the files a pattern matches (in name order), checks
//! that shape in each on its own, and appends each well-shaped file to the
//! main text, remembering where each begins ([`Segment`]). The validator
//! then checks the whole set as one config and locates every error in the
//! file and line it came from; [`check_bindings`] adds the include rules:
//! an include's customers belong to its reseller, and its clients to that
//! reseller's customers.

use super::validate::{ConfigError, Rule, line_col};
use std::path::{Path, PathBuf};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Files one pattern may match at most (a bound on what a reload reads).
pub const MAX_FILES: usize = 10_000;

/// Where part of the combined text came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Its first byte in the combined text.
    pub start: usize,
    /// The file.
    pub file: PathBuf,
    /// The `[[include]]` it came through (index in the main file's list),
    /// or None for the main file.
    pub include: Option<usize>,
}

/// One `[[include]]` of the main file, as [`assemble`] read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    /// The directory its pattern lists.
    pub dir: PathBuf,
    /// The file-name pattern (`*.toml`).
    pub pattern: String,
    /// The reseller its customers belong to; None = the admin's (any).
    pub reseller: Option<String>,
    /// Where its `path` is written in the main file.
    pub span: std::ops::Range<usize>,
}

impl Include {
    /// Whether a file named `name` in its directory is one of its files.
    /// Hidden files (editors' swap and temp files) never are.
    pub fn takes(&self, name: &str) -> bool {
        !name.starts_with('.') && matches(&self.pattern, name)
    }
}

/// The main file's `[[include]]` entries, read leniently: a broken entry
/// is the validator's to report, so it is skipped here.
fn includes_of(main: &str, dir: &Path) -> Vec<Include> {
    let Ok(root) = DeTable::parse(main) else {
        return Vec::new();
    };
    let Some((_, list)) = root
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref() == "include")
    else {
        return Vec::new();
    };
    let Some(list) = list.get_ref().as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|entry| {
            let t = entry.get_ref().as_table()?;
            let get = |key: &str| {
                t.iter()
                    .find(|(k, _)| k.get_ref() == key)
                    .and_then(|(_, v)| Some((v.get_ref().as_str()?.to_string(), v.span())))
            };
            let (path, span) = get("path")?;
            let path = dir.join(path);
            let pattern = path.file_name()?.to_str()?.to_string();
            Some(Include {
                dir: path.parent()?.to_path_buf(),
                pattern,
                reseller: get("reseller").map(|(r, _)| r),
                span,
            })
        })
        .collect()
}

/// Whether `name` matches `pattern` (`*` any run, `?` one character).
pub fn matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// The files `inc` names, in name order. Hidden files (editors' swap and
/// temp files) never match.
pub fn files_of(inc: &Include) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(&inc.dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !inc.takes(name) {
            continue;
        }
        if e.file_type()?.is_file() || e.path().is_file() {
            out.push(e.path());
        }
        if out.len() > MAX_FILES {
            break;
        }
    }
    out.sort();
    Ok(out)
}

/// The main text with every included file appended, the segments, the
/// includes, and the problems found in the included files on their own.
pub fn assemble(main: &str, path: &Path) -> (String, Vec<Segment>, Vec<Include>, Vec<ConfigError>) {
    assemble_with(main, path, None)
}

/// [`assemble`], with `overlay` (an included file's path and text) read in
/// place of what is on disk there, or added when it is not there yet: the
/// console's form checks a customer file this way before writing it.
pub fn assemble_with(
    main: &str,
    path: &Path,
    overlay: Option<(&Path, &str)>,
) -> (String, Vec<Segment>, Vec<Include>, Vec<ConfigError>) {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    let includes = includes_of(main, &dir);
    let mut text = main.to_string();
    let mut segments = vec![Segment {
        start: 0,
        file: path.to_path_buf(),
        include: None,
    }];
    let mut errors = Vec::new();
    for (i, inc) in includes.iter().enumerate() {
        let (line, column) = line_col(main, inc.span.start);
        let at_path = |message: String| ConfigError {
            rule: Rule::Include,
            file: path.to_path_buf(),
            line,
            column,
            key: format!("include[#{}].path", i + 1),
            message,
        };
        let files = match files_of(inc) {
            Ok(mut f) => {
                if let Some((o, _)) = overlay
                    && o.parent() == Some(inc.dir.as_path())
                    && o.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| inc.takes(n))
                    && !f.iter().any(|x| x == o)
                {
                    f.push(o.to_path_buf());
                    f.sort();
                }
                f
            }
            Err(e) => {
                errors.push(at_path(format!(
                    "cannot read the directory {}: {e}",
                    inc.dir.display()
                )));
                continue;
            }
        };
        if files.len() > MAX_FILES {
            errors.push(at_path(format!(
                "more than {MAX_FILES} files match in {}",
                inc.dir.display()
            )));
            continue;
        }
        for f in files {
            let read = match overlay {
                Some((o, text)) if o == f => Ok(text.to_string()),
                _ => std::fs::read_to_string(&f),
            };
            let src = match read {
                Ok(s) => s,
                Err(e) => {
                    errors.push(ConfigError {
                        rule: Rule::Include,
                        file: f.clone(),
                        line: 1,
                        column: 1,
                        key: "(file)".into(),
                        message: format!("cannot read an included file: {e}"),
                    });
                    continue;
                }
            };
            let shape = shape_errors(&src, &f);
            if !shape.is_empty() {
                errors.extend(shape);
                continue;
            }
            if !text.ends_with('\n') {
                text.push('\n');
            }
            segments.push(Segment {
                start: text.len(),
                file: f,
                include: Some(i),
            });
            text.push_str(&src);
        }
    }
    (text, segments, includes, errors)
}

/// An included file holds `[[customer]]` and `[[client]]` tables only.
fn shape_errors(src: &str, file: &Path) -> Vec<ConfigError> {
    let err = |span: std::ops::Range<usize>, key: String, message: String| {
        let (line, column) = line_col(src, span.start);
        ConfigError {
            rule: Rule::Include,
            file: file.to_path_buf(),
            line,
            column,
            key,
            message,
        }
    };
    let root = match DeTable::parse(src) {
        Ok(r) => r,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            return vec![err(
                span,
                "(document)".into(),
                format!("not TOML: {}", e.message().trim()),
            )];
        }
    };
    let mut out = Vec::new();
    for (k, v) in root.get_ref().iter() {
        let key = k.get_ref().to_string();
        let ok = matches!(key.as_str(), "customer" | "client") && is_table_array(v);
        if !ok {
            out.push(err(
                k.span(),
                key.clone(),
                format!(
                    "an included file may hold only [[customer]] and [[client]] tables, not `{key}`; server, reseller and include settings belong in the main file"
                ),
            ));
        }
    }
    out
}

fn is_table_array(v: &Spanned<DeValue<'_>>) -> bool {
    v.get_ref()
        .as_array()
        .is_some_and(|a| a.iter().all(|e| e.get_ref().as_table().is_some()))
}

/// The segment the combined text's byte `at` lies in; None without
/// segments (a text validated on its own, `Config::from_str`).
pub fn segment_of(segments: &[Segment], at: usize) -> Option<&Segment> {
    let i = segments.partition_point(|s| s.start <= at).max(1) - 1;
    segments.get(i)
}
