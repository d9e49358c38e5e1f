//! Turning routes.yaml text into a [`ConfigSpec`] plus a [`Locator`]: `${VAR}` interpolation,
//! the one YAML parse, and a map from each node's path to its line and column so that every
//! validation error can point at the text. Runs at load time only; no I/O besides env lookups.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::ConfigError;
use super::model::ConfigSpec;

/// Line and column (both 1-based) of a node in the original file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// Maps node paths such as `routes[2].match.path` to where they were written.
#[derive(Debug, Default, Clone)]
pub struct Locator {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
    scalars: HashMap<String, String>,
    shifts: Shifts,
}

impl Locator {
    /// Where the value at `path` starts; falls back to the nearest enclosing node.
    pub fn at(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.values.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return Pos { line: 1, column: 1 },
            }
        }
    }

    /// Where the key naming `path` was written (`backends.orders` → the `orders:` key).
    pub fn key(&self, path: &str) -> Pos {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.at(path))
    }

    /// The scalar written at `path`, if any (used to name a route by id in parse errors).
    pub fn scalar(&self, path: &str) -> Option<&str> {
        self.scalars.get(path).map(String::as_str)
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    loc: Locator,
}

impl Builder {
    fn pos(&self, m: Marker) -> Pos {
        let line = m.line();
        let column = self.loc.shifts.original_column(line, m.col() + 1);
        Pos { line, column }
    }

    /// The path of the node that is starting now, or `None` when it is a mapping key.
    fn node_path(&mut self, ev: &Event, pos: Pos) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some(join(path, &k)),
                None => {
                    let k = match ev {
                        Event::Scalar(s, ..) => s.clone(),
                        _ => String::from("?"),
                    };
                    let full = join(path, &k);
                    self.loc.keys.insert(full, pos);
                    *key = Some(k);
                    None
                }
            },
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = self.pos(mark);
        match ev {
            Event::SequenceEnd | Event::MappingEnd => {
                self.stack.pop();
            }
            Event::Scalar(..)
            | Event::Alias(..)
            | Event::SequenceStart(..)
            | Event::MappingStart(..) => {
                let Some(path) = self.node_path(&ev, pos) else {
                    return;
                };
                self.loc.values.entry(path.clone()).or_insert(pos);
                match ev {
                    Event::Scalar(s, ..) => {
                        self.loc.scalars.insert(path, s);
                    }
                    Event::SequenceStart(..) => self.stack.push(Frame::Seq { path, index: 0 }),
                    Event::MappingStart(..) => self.stack.push(Frame::Map { path, key: None }),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Column shifts made by interpolation, to report columns of the text the operator wrote.
#[derive(Debug, Default, Clone)]
struct Shifts {
    /// Per 1-based line: (column in interpolated text where a substitution ended, delta).
    by_line: HashMap<usize, Vec<(usize, isize)>>,
}

impl Shifts {
    fn original_column(&self, line: usize, col: usize) -> usize {
        let Some(list) = self.by_line.get(&line) else {
            return col;
        };
        let mut delta = 0isize;
        for (end, d) in list {
            if col >= *end {
                delta += d;
            }
        }
        (col as isize - delta).max(1) as usize
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` outside comments; `$${` writes a literal `${`.
/// Values may not contain newlines (they would change the YAML's structure).
fn interpolate(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, Shifts), Vec<ConfigError>> {
    let mut out = String::with_capacity(text.len());
    let mut shifts = Shifts::default();
    let mut errors = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = i + 1;
        let bytes = line.as_bytes();
        let (mut quote, mut j, mut col_out) = (None::<u8>, 0usize, 1usize);
        while j < bytes.len() {
            let c = bytes[j];
            match (quote, c) {
                (None, b'#') if j == 0 || bytes[j - 1].is_ascii_whitespace() => {
                    out.push_str(&line[j..]);
                    break;
                }
                (None, b'\'' | b'"') => quote = Some(c),
                (Some(q), _) if q == c => quote = None,
                _ => {}
            }
            if c == b'$' && line[j..].starts_with("$${") {
                out.push_str("${");
                j += 3;
                col_out += 2;
                shifts
                    .by_line
                    .entry(lineno)
                    .or_default()
                    .push((col_out, -1));
                continue;
            }
            if c == b'$' && line[j..].starts_with("${") {
                let Some(end) = line[j..].find('}') else {
                    errors.push(ConfigError::at(
                        file,
                        lineno,
                        j + 1,
                        "unterminated `${`: write `${VAR}` or `${VAR:-default}`, or `$${` for a literal `${`",
                    ));
                    out.push_str(&line[j..]);
                    break;
                };
                let inner = &line[j + 2..j + end];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                let valid = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                let value = if !valid {
                    errors.push(ConfigError::at(
                        file,
                        lineno,
                        j + 1,
                        format!("`${{{inner}}}` is not a valid variable reference: names use letters, digits and `_`"),
                    ));
                    String::new()
                } else {
                    match (env(name), default) {
                        (Some(v), None) => v,
                        (Some(v), Some(_)) if !v.is_empty() => v,
                        (_, Some(d)) => d.to_string(),
                        (None, None) => {
                            errors.push(ConfigError::at(
                                file,
                                lineno,
                                j + 1,
                                format!("environment variable `{name}` is not set; set it or write `${{{name}:-default}}`"),
                            ));
                            String::new()
                        }
                    }
                };
                if value.contains(['\n', '\r']) {
                    errors.push(ConfigError::at(
                        file,
                        lineno,
                        j + 1,
                        format!("environment variable `{name}` contains a line break, which is not allowed in routes.yaml"),
                    ));
                }
                let written = end + 1;
                out.push_str(&value);
                col_out += value.chars().count();
                shifts
                    .by_line
                    .entry(lineno)
                    .or_default()
                    .push((col_out, value.chars().count() as isize - written as isize));
                j += written;
                continue;
            }
            let ch_len = line[j..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&line[j..j + ch_len]);
            j += ch_len;
            col_out += 1;
        }
    }
    if errors.is_empty() {
        Ok((out, shifts))
    } else {
        Err(errors)
    }
}

/// THE YAML parse of the project: interpolate, locate, deserialize.
pub fn parse(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(ConfigSpec, Locator), Vec<ConfigError>> {
    let (text, shifts) = interpolate(file, text, env)?;
    let mut builder = Builder {
        loc: Locator {
            shifts,
            ..Locator::default()
        },
        ..Builder::default()
    };
    let mut parser = Parser::new_from_str(&text);
    if let Err(e) = parser.load(&mut builder, false) {
        let m = e.marker();
        let line = m.line();
        let column = builder.loc.shifts.original_column(line, m.col() + 1);
        return Err(vec![ConfigError::at(
            file,
            line,
            column,
            format!("invalid YAML: {}", e.info()),
        )]);
    }
    let loc = builder.loc;
    if text.trim().is_empty() {
        return Err(vec![ConfigError::at(
            file,
            1,
            1,
            "the file is empty; it needs at least `routes:`",
        )]);
    }
    let de = serde_yaml::Deserializer::from_str(&text);
    match serde_path_to_error::deserialize::<_, ConfigSpec>(de) {
        Ok(spec) => Ok((spec, loc)),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // Prefer the exact node the path names; then the parser's own mark; then the
            // nearest enclosing node.
            let unknown_key = inner.to_string().contains("unknown field");
            let pos = match (loc.values.get(&path), inner.location()) {
                (Some(_), _) if unknown_key => loc.key(&path),
                (Some(p), _) => *p,
                (None, Some(l)) => Pos {
                    line: l.line(),
                    column: loc.shifts.original_column(l.line(), l.column()),
                },
                (None, None) => loc.at(&path),
            };
            let mut message = inner.to_string();
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
            if let Some((prefix, rest)) = message.split_once(": ")
                && !prefix.contains(' ')
            {
                message = rest.to_string();
            }
            if path != "." && !path.is_empty() {
                message = format!("`{path}`: {message}");
            }
            let route = path
                .strip_prefix("routes[")
                .and_then(|r| r.split_once(']'))
                .and_then(|(n, _)| loc.scalar(&format!("routes[{n}].id")))
                .map(str::to_string);
            Err(vec![ConfigError {
                route,
                ..ConfigError::at(file, pos.line, pos.column, message)
            }])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.1".into()),
            _ => None,
        }
    }

    #[test]
    fn interpolates_outside_comments() {
        let (out, _) =
            interpolate("f", "a: ${HOST}:${PORT:-80} # ${NOPE}\nb: $${HOST}\n", &env).unwrap();
        assert_eq!(out, "a: 10.0.0.1:80 # ${NOPE}\nb: ${HOST}\n");
    }

    #[test]
    fn missing_variable_has_position() {
        let errs = interpolate("f", "a: 1\nb:  ${NOPE}\n", &env).unwrap_err();
        assert_eq!((errs[0].line, errs[0].column), (2, 5));
    }

    #[test]
    fn locator_finds_nodes_and_maps_columns_back() {
        let text = "backends:\n  b: { type: http, endpoints: [\"${HOST}\"] }\nroutes:\n  - id: r1\n    match: { path: /x }\n    backend: ${HOST}\n";
        let (_, loc) = parse("f", text, &env).unwrap_err_or_ok();
        assert_eq!(loc.at("routes[0].id"), Pos { line: 4, column: 9 });
        assert_eq!(
            loc.at("routes[0].backend"),
            Pos {
                line: 6,
                column: 14
            }
        );
        assert_eq!(loc.key("backends.b"), Pos { line: 2, column: 3 });
    }

    trait OkOrErr {
        fn unwrap_err_or_ok(self) -> (Option<ConfigSpec>, Locator);
    }
    impl OkOrErr for Result<(ConfigSpec, Locator), Vec<ConfigError>> {
        fn unwrap_err_or_ok(self) -> (Option<ConfigSpec>, Locator) {
            match self {
                Ok((s, l)) => (Some(s), l),
                Err(e) => panic!("{e:?}"),
            }
        }
    }
}
