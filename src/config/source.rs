//! The config text before serde sees it: `${VAR}` substitution, and a map
//! from a value's path (`devices[1].name`) to its line and column, so that
//! errors found after parsing still point at the right place.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A `${VAR}` whose variable is not set, with its 1-based place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsetVar {
    pub name: String,
    pub line: usize,
    pub column: usize,
}

/// Replaces `${VAR}` with the variable's value from `lookup`. Comments are
/// left alone, so a commented-out example may name a variable that is not
/// set. `$${` stands for a literal `${`.
pub fn substitute_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<UnsetVar>> {
    let mut out = String::with_capacity(text.len());
    let mut unset = Vec::new();
    for (lineno, line) in text.split_inclusive('\n').enumerate() {
        let code_end = comment_start(line).unwrap_or(line.len());
        let (code, comment) = line.split_at(code_end);
        let mut i = 0;
        while let Some(found) = code[i..].find('$') {
            let pos = i + found;
            out.push_str(&code[i..pos]);
            let after = &code[pos..];
            if after.starts_with("$${") {
                out.push_str("${");
                i = pos + 3;
                continue;
            }
            let var = after
                .strip_prefix("${")
                .and_then(|a| a.find('}').map(|end| &a[..end]))
                .filter(|n| {
                    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
            match var {
                Some(name) => {
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => unset.push(UnsetVar {
                            name: name.to_string(),
                            line: lineno + 1,
                            column: code[..pos].chars().count() + 1,
                        }),
                    }
                    i = pos + name.len() + 3;
                }
                None => {
                    out.push('$');
                    i = pos + 1;
                }
            }
        }
        let rest = &code[i..];
        out.push_str(rest);
        out.push_str(comment);
    }
    if unset.is_empty() {
        Ok(out)
    } else {
        Err(unset)
    }
}

/// Byte offset where a YAML comment starts on this line, if any: a `#` at
/// the start or after white space, outside quotes.
fn comment_start(line: &str) -> Option<usize> {
    let mut in_single = false;
    let mut in_double = false;
    let mut prev_ws = true;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if in_double {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_double = false;
            }
        } else if in_single {
            if c == '\'' {
                in_single = false;
            }
        } else if c == '#' && prev_ws {
            return Some(i);
        } else if c == '"' && prev_ws_or_flow(line, i) {
            in_double = true;
        } else if c == '\'' && prev_ws_or_flow(line, i) {
            in_single = true;
        }
        prev_ws = c.is_whitespace();
    }
    None
}

/// A quote opens a quoted scalar only at the start of a value.
fn prev_ws_or_flow(line: &str, i: usize) -> bool {
    match line[..i].chars().next_back() {
        None => true,
        Some(c) => c.is_whitespace() || matches!(c, ':' | ',' | '[' | '{' | '-'),
    }
}

/// Where each value of a YAML document starts, by path: `gateway.id`,
/// `devices[0].points[2].name`. A mapping's path points at its first key.
#[derive(Debug, Default, Clone)]
pub struct Locator {
    places: HashMap<String, (usize, usize)>,
    /// Keys given twice in one mapping: the path and the place of the
    /// second one.
    duplicates: Vec<(String, (usize, usize))>,
}

impl Locator {
    /// Builds the map; a document that does not parse gives an empty map
    /// (serde reports the syntax error with its own place).
    pub fn new(text: &str) -> Locator {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return Locator::default();
        }
        Locator {
            places: builder.places,
            duplicates: builder.duplicates,
        }
    }

    /// The first key given twice in one mapping: its path and the place of
    /// the repeat (serde reports the mapping's start instead).
    pub fn first_duplicate(&self) -> Option<(&str, (usize, usize))> {
        self.duplicates
            .first()
            .map(|(p, place)| (p.as_str(), *place))
    }

    /// The 1-based line and column of the value at `path`, or of the
    /// nearest parent that exists.
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(place) = self.places.get(p) {
                return Some(*place);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// The place of the key of `path` (for "unknown key"-like problems),
    /// falling back to the value.
    pub fn find_key(&self, path: &str) -> Option<(usize, usize)> {
        self.places
            .get(&format!("{path}#key"))
            .copied()
            .or_else(|| self.find(path))
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    places: HashMap<String, (usize, usize)>,
    duplicates: Vec<(String, (usize, usize))>,
}

impl Builder {
    /// The path of the value that starts now, advancing the parent.
    fn next_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => key.take().map(|k| {
                if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                }
            }),
        }
    }

    fn place(mark: Marker) -> (usize, usize) {
        (mark.line(), mark.col() + 1)
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => {
                let is_key = matches!(self.stack.last(), Some(Frame::Map { key: None, .. }));
                if is_key {
                    if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                        let full = if path.is_empty() {
                            text.clone()
                        } else {
                            format!("{path}.{text}")
                        };
                        let place = Self::place(mark);
                        if self.places.insert(format!("{full}#key"), place).is_some() {
                            self.duplicates.push((full, place));
                        }
                        *key = Some(text);
                    }
                } else if let Some(p) = self.next_path() {
                    self.places.entry(p).or_insert(Self::place(mark));
                }
            }
            Event::MappingStart(..) => {
                let p = self.next_path().unwrap_or_default();
                self.places.entry(p.clone()).or_insert(Self::place(mark));
                self.stack.push(Frame::Map { path: p, key: None });
            }
            Event::SequenceStart(..) => {
                let p = self.next_path().unwrap_or_default();
                self.places.entry(p.clone()).or_insert(Self::place(mark));
                self.stack.push(Frame::Seq { path: p, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                self.next_path();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PW" => Some("s3cret".into()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_set_variables() {
        let out = substitute_env("password: ${PW}\n", env).unwrap();
        assert_eq!(out, "password: s3cret\n");
    }

    #[test]
    fn unset_variable_names_its_place() {
        let err = substitute_env("a: 1\nb: x${NOPE}\n", env).unwrap_err();
        assert_eq!(
            err,
            vec![UnsetVar {
                name: "NOPE".into(),
                line: 2,
                column: 5
            }]
        );
    }

    #[test]
    fn comments_are_not_substituted() {
        let text = "a: 1 # ${NOPE}\n# password: ${NOPE}\nb: \"#${PW}\"\n";
        let out = substitute_env(text, env).unwrap();
        assert_eq!(out, "a: 1 # ${NOPE}\n# password: ${NOPE}\nb: \"#s3cret\"\n");
    }

    #[test]
    fn escaped_dollar_stays() {
        assert_eq!(substitute_env("a: $${PW}\n", env).unwrap(), "a: ${PW}\n");
        assert_eq!(substitute_env("a: $5\n", env).unwrap(), "a: $5\n");
    }

    #[test]
    fn a_repeated_key_is_found_where_it_repeats() {
        let text = "gateway: { id: g }\ndevices:\n  - name: a\n    poll: 1s\n    poll: 2s\n";
        let loc = Locator::new(text);
        assert_eq!(loc.first_duplicate(), Some(("devices[0].poll", (5, 5))));
        assert_eq!(Locator::new("a: 1\nb: 2\n").first_duplicate(), None);
    }

    #[test]
    fn locator_finds_nested_paths() {
        let text = "gateway:\n  id: gw\ndevices:\n  - name: a\n    points:\n      - { name: p, x: 1 }\n  - name: b\n";
        let loc = Locator::new(text);
        assert_eq!(loc.find("gateway.id"), Some((2, 7)));
        assert_eq!(loc.find("devices[0].name"), Some((4, 11)));
        assert_eq!(loc.find("devices[0].points[0].name"), Some((6, 17)));
        assert_eq!(loc.find("devices[1].name"), Some((7, 11)));
        assert_eq!(loc.find_key("devices[1].name"), Some((7, 5)));
        // A missing child falls back to its parent.
        assert_eq!(loc.find("devices[1].poll"), loc.find("devices[1]"));
    }
}
