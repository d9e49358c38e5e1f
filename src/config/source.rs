//! Turning routes.yaml text into a [`ConfigSpec`] plus a [`Locator`]: the YAML parse (see
//! [`parse`]), a map from each node's path to its line and column so that every validation
//! error can point at the text, duplicate keys refused, and `${VAR}` interpolation inside parsed scalar values (so
//! an environment value can never change the YAML's structure). Runs at load time only; no I/O
//! besides env lookups.

use std::collections::{HashMap, HashSet};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

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
    /// How each scalar was written: plain (unquoted) ones are typed after interpolation, and
    /// an error inside one is placed at its column.
    styles: HashMap<String, TScalarStyle>,
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

    /// This locator for a spec holding only some of the file's routes: `kept[j]` is the index
    /// in the file of the spec's route `j`.
    fn renumbered_routes(&self, kept: &[usize]) -> Locator {
        let new_index: HashMap<usize, usize> =
            kept.iter().enumerate().map(|(j, &i)| (i, j)).collect();
        let rename = |path: &String| -> Option<String> {
            let Some(rest) = path.strip_prefix("routes[") else {
                return Some(path.clone());
            };
            let (n, tail) = rest.split_once(']')?;
            let j = new_index.get(&n.parse::<usize>().ok()?)?;
            Some(format!("routes[{j}]{tail}"))
        };
        fn remap<V: Clone>(
            m: &HashMap<String, V>,
            rename: &impl Fn(&String) -> Option<String>,
        ) -> HashMap<String, V> {
            m.iter()
                .filter_map(|(k, v)| Some((rename(k)?, v.clone())))
                .collect()
        }
        Locator {
            values: remap(&self.values, &rename),
            keys: remap(&self.keys, &rename),
            scalars: remap(&self.scalars, &rename),
            styles: remap(&self.styles, &rename),
        }
    }
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
        seen: HashSet<String>,
    },
    Seq {
        path: String,
        index: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    loc: Locator,
    /// Keys written twice in one mapping: the path and where the second one is.
    duplicates: Vec<(String, Pos)>,
}

impl Builder {
    fn pos(&self, m: Marker) -> Pos {
        Pos {
            line: m.line(),
            column: m.col() + 1,
        }
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
            Some(Frame::Map { path, key, seen }) => match key.take() {
                Some(k) => Some(join(path, &k)),
                None => {
                    let k = match ev {
                        Event::Scalar(s, ..) => s.clone(),
                        _ => String::from("?"),
                    };
                    let full = join(path, &k);
                    if !seen.insert(k.clone()) {
                        self.duplicates.push((full.clone(), pos));
                    }
                    self.loc.keys.entry(full).or_insert(pos);
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
                    // Kept only where they are read, so that a file of many routes costs
                    // little beyond the positions: styles of values to interpolate, and the
                    // ids that name routes in errors.
                    Event::Scalar(s, style, ..) => {
                        if s.contains('$') {
                            self.loc.styles.insert(path.clone(), style);
                        }
                        if path.ends_with(".id") {
                            self.loc.scalars.insert(path, s);
                        }
                    }
                    Event::SequenceStart(..) => self.stack.push(Frame::Seq { path, index: 0 }),
                    Event::MappingStart(..) => self.stack.push(Frame::Map {
                        path,
                        key: None,
                        seen: HashSet::new(),
                    }),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in one scalar value; `$${` writes a literal `${`.
/// Errors carry the offset of the reference in the value.
fn interpolate(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    let mut offset = 0;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let at = offset + i;
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
            offset = at + 3;
            continue;
        }
        if !tail.starts_with("${") {
            out.push('$');
            rest = &tail[1..];
            offset = at + 1;
            continue;
        }
        let Some(end) = tail.find('}') else {
            return Err((
                at,
                "unterminated `${`: write `${VAR}` or `${VAR:-default}`, or `$${` for a literal `${`"
                    .into(),
            ));
        };
        let inner = &tail[2..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err((
                at,
                format!(
                    "`${{{inner}}}` is not a valid variable reference: names use letters, digits and `_`"
                ),
            ));
        }
        match (env(name), default) {
            (Some(v), None) => out.push_str(&v),
            (Some(v), Some(_)) if !v.is_empty() => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err((
                    at,
                    format!(
                        "environment variable `{name}` is not set; set it or write `${{{name}:-default}}`"
                    ),
                ));
            }
        }
        rest = &tail[end + 1..];
        offset = at + end + 1;
    }
    out.push_str(rest);
    Ok(out)
}

/// Interpolates every string scalar of `v` (at `path`, as the [`Locator`] names nodes). A plain
/// scalar whose text changed is typed again as YAML would type it (`${PORT}` → a number), but
/// only ever as a scalar: whatever a variable holds (`,`, `}`, `: `, ` #`, line breaks) stays
/// inside the value it was written in.
fn interpolate_tree(
    v: &mut serde_yaml::Value,
    path: &str,
    loc: &Locator,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    use serde_yaml::Value;
    match v {
        Value::String(s) if s.contains('$') => match interpolate(s, env) {
            Ok(out) if out != *s => {
                let typed = (loc.styles.get(path) == Some(&TScalarStyle::Plain))
                    .then(|| serde_yaml::from_str::<Value>(&out).ok())
                    .flatten()
                    .filter(|t| matches!(t, Value::Bool(_) | Value::Number(_)));
                *v = typed.unwrap_or(Value::String(out));
            }
            Ok(_) => {}
            Err((offset, message)) => {
                let mut pos = loc.at(path);
                // Exact for values on one line (quoted ones without escapes before it).
                if !s.contains('\n') {
                    pos.column += match loc.styles.get(path) {
                        Some(TScalarStyle::Plain) => offset,
                        Some(TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted) => offset + 1,
                        _ => 0,
                    };
                }
                errors.push(ConfigError::at(file, pos.line, pos.column, message));
            }
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_tree(item, &format!("{path}[{i}]"), loc, file, env, errors);
            }
        }
        Value::Mapping(map) => {
            for (k, item) in map.iter_mut() {
                let key = match k {
                    Value::String(k) => k.clone(),
                    other => serde_yaml::to_string(other)
                        .map(|s| s.trim().to_string())
                        .unwrap_or_default(),
                };
                interpolate_tree(item, &join(path, &key), loc, file, env, errors);
            }
        }
        Value::Tagged(t) => interpolate_tree(&mut t.value, path, loc, file, env, errors),
        _ => {}
    }
}

/// The positions of `text`'s nodes, without deserializing it: where a problem found later (by
/// a build) is placed. A file that is not valid YAML gives what could be read.
pub fn locate(text: &str) -> Locator {
    let mut builder = Builder::default();
    let _ = Parser::new_from_str(text).load(&mut builder, false);
    builder.loc
}

impl Locator {
    /// Where the route with this `id` was written, when it was (a route a backend generated
    /// was not).
    pub fn route(&self, id: &str) -> Option<Pos> {
        self.route_field(id, None)
    }

    /// Where `field` (`grpc.method`, `plugins[0]`) of the route with this `id` was written,
    /// or the route's entry when the field was not written or is `None`.
    pub fn route_field(&self, id: &str, field: Option<&str>) -> Option<Pos> {
        let path = self
            .scalars
            .iter()
            .find(|(k, v)| v.as_str() == id && k.starts_with("routes[") && k.ends_with(".id"))
            .map(|(k, _)| k.clone())?;
        let entry = path.strip_suffix(".id").unwrap_or(&path);
        Some(
            match field.and_then(|f| self.values.get(&format!("{entry}.{f}"))) {
                Some(pos) => *pos,
                None => self.key(&path),
            },
        )
    }
}

/// A deserialized spec, or serde's error with the path where it happened.
type Deserialized = Result<ConfigSpec, serde_path_to_error::Error<serde_yaml::Error>>;

/// The spec from `text` through a YAML tree whose string values are interpolated first.
fn interpolated(
    file: &str,
    text: &str,
    loc: &Locator,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Deserialized, Vec<ConfigError>> {
    let mut value: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            let mut message = e.to_string();
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
            return Err(vec![ConfigError::at(
                file,
                line,
                column,
                format!("invalid YAML: {message}"),
            )]);
        }
    };
    let mut errors = Vec::new();
    interpolate_tree(&mut value, "", loc, file, env, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(serde_path_to_error::deserialize::<_, ConfigSpec>(value))
}

/// THE YAML parse of the project: locate, refuse duplicate keys, parse, interpolate the
/// values, deserialize.
///
/// Two parsers read the text, behind this one function. yaml-rust2's events give every node's
/// position (serde_yaml gives one only for its first error, and validation places problems
/// found after deserializing). serde_yaml deserializes the model straight from the text,
/// without a tree: a large file's memory is mostly that tree. No maintained crate does both:
/// serde-saphyr 2.2 records node paths only inside its garde/validator integrations (its path
/// recorder is private), and its `Spanned<T>` would have to wrap every field of the model.
pub fn parse(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(ConfigSpec, Locator), Vec<ConfigError>> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, false) {
        let m = e.marker();
        return Err(vec![ConfigError::at(
            file,
            m.line(),
            m.col() + 1,
            format!("invalid YAML: {}", e.info()),
        )]);
    }
    let loc = builder.loc;
    if !builder.duplicates.is_empty() {
        return Err(builder
            .duplicates
            .iter()
            .map(|(path, pos)| {
                ConfigError::at(
                    file,
                    pos.line,
                    pos.column,
                    format!(
                        "`{path}` is written twice in the same mapping; the second would silently replace the first"
                    ),
                )
            })
            .collect());
    }
    if text.trim().is_empty() {
        return Err(vec![ConfigError::at(
            file,
            1,
            1,
            "the file is empty; it needs at least `routes:`",
        )]);
    }
    // Without a `${` there is nothing to interpolate: the text is deserialized directly,
    // without the intermediate tree (a large file's memory is mostly that tree).
    let parsed = if text.contains("${") {
        interpolated(file, text, &loc, env)?
    } else {
        serde_path_to_error::deserialize::<_, ConfigSpec>(serde_yaml::Deserializer::from_str(text))
    };
    match parsed {
        Ok(spec) => Ok((spec, loc)),
        Err(e) => {
            // Serde stops at the first problem: read each section and item on its own to find
            // every one, and validate what could be read.
            let first = located(file, &loc, "", e);
            let mut value: serde_yaml::Value = match serde_yaml::from_str(text) {
                Ok(v) => v,
                Err(_) => return Err(vec![first]),
            };
            let mut ignored = Vec::new();
            interpolate_tree(&mut value, "", &loc, file, env, &mut ignored);
            let errors = every_problem(file, &loc, &value);
            Err(if errors.is_empty() {
                vec![first]
            } else {
                errors
            })
        }
    }
}

/// A serde error at `prefix` + its own path, placed at the node it names (at the key for an
/// unknown field), with the route's id when it is inside one.
fn located(
    file: &str,
    loc: &Locator,
    prefix: &str,
    e: serde_path_to_error::Error<serde_yaml::Error>,
) -> ConfigError {
    let own = e.path().to_string();
    let path = match (prefix.is_empty(), own.as_str()) {
        (true, _) => own.clone(),
        (false, "." | "") => prefix.to_string(),
        (false, p) if p.starts_with('[') => format!("{prefix}{p}"),
        (false, p) => format!("{prefix}.{p}"),
    };
    let inner = e.into_inner();
    let unknown_key = inner.to_string().contains("unknown field");
    let pos = match loc.values.get(&path) {
        Some(_) if unknown_key => loc.key(&path),
        Some(p) => *p,
        None => loc.at(&path),
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
    if let Some(hint) = did_you_mean(&message) {
        message.push_str(&hint);
    }
    if path != "." && !path.is_empty() {
        message = format!("`{path}`: {message}");
    }
    let route = path
        .strip_prefix("routes[")
        .and_then(|r| r.split_once(']'))
        .and_then(|(n, _)| loc.scalar(&format!("routes[{n}].id")))
        .map(str::to_string);
    ConfigError {
        route,
        ..ConfigError::at(file, pos.line, pos.column, message)
    }
}

/// For serde's "unknown field `timout`, expected one of `id`, …, `timeout`" (or "unknown
/// variant"): "; did you mean `timeout`?" when one expected name is close to what was written.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (written, expected) = rest.split_once('`')?;
    let best = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (strsim::damerau_levenshtein(written, name), name))
        .min()?;
    // One or two edits, and never more than a third of the name (`ab` is not `id`).
    (best.0 <= 2 && best.0 * 3 <= written.len().max(best.1.len()))
        .then(|| format!("; did you mean `{}`?", best.1))
}

/// Every problem of a file serde could not read whole: each section, backend and route is read
/// on its own, and what could be read is validated — except for routes whose backend could not
/// be read (they would only repeat that problem).
fn every_problem(file: &str, loc: &Locator, value: &serde_yaml::Value) -> Vec<ConfigError> {
    use serde_yaml::Value;
    fn read<T: serde::de::DeserializeOwned>(
        file: &str,
        loc: &Locator,
        path: &str,
        v: &Value,
        errors: &mut Vec<ConfigError>,
    ) -> Option<T> {
        serde_path_to_error::deserialize::<_, T>(v.clone())
            .map_err(|e| errors.push(located(file, loc, path, e)))
            .ok()
    }
    let Value::Mapping(top) = value else {
        return Vec::new();
    };
    let Ok(mut partial) = serde_yaml::from_value::<ConfigSpec>(Value::Mapping(Default::default()))
    else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    let mut broken_backends = HashSet::new();
    // The index in the file of each route read.
    let mut kept = Vec::new();
    for (k, v) in top {
        let key = k.as_str().unwrap_or("?");
        match (key, v) {
            ("server", _) => {
                if let Some(x) = read(file, loc, key, v, &mut errors) {
                    partial.server = x;
                }
            }
            ("defaults", _) => {
                if let Some(x) = read(file, loc, key, v, &mut errors) {
                    partial.defaults = x;
                }
            }
            ("state", _) => {
                if let Some(x) = read(file, loc, key, v, &mut errors) {
                    partial.state = x;
                }
            }
            ("backends", Value::Mapping(m)) => {
                for (name, b) in m {
                    let name = name.as_str().unwrap_or("?").to_string();
                    let path = join(key, &name);
                    match read(file, loc, &path, b, &mut errors) {
                        Some(x) => {
                            partial.backends.insert(name, x);
                        }
                        None => {
                            broken_backends.insert(name);
                        }
                    }
                }
            }
            ("routes", Value::Sequence(items)) => {
                for (i, r) in items.iter().enumerate() {
                    if let Some(x) = read(file, loc, &format!("routes[{i}]"), r, &mut errors) {
                        partial.routes.push(x);
                        kept.push(i);
                    }
                }
            }
            // An unknown key, or a section of the wrong shape: serde's own message for it.
            _ => {
                let alone = Value::Mapping([(k.clone(), v.clone())].into_iter().collect());
                let _ = read::<ConfigSpec>(file, loc, "", &alone, &mut errors);
            }
        }
    }
    if errors.is_empty() {
        return errors;
    }
    let skipped: HashSet<&str> = partial
        .routes
        .iter()
        .filter(|r| broken_backends.contains(&r.backend))
        .map(|r| r.id.as_str())
        .collect();
    // Validation names routes by their index in the spec it checks: positions are looked up
    // under the indices the routes have in the file.
    let loc = loc.renumbered_routes(&kept);
    errors.extend(
        super::validate::validate(file, &partial, &loc)
            .into_iter()
            .filter(|e| e.route.as_deref().is_none_or(|r| !skipped.contains(r))),
    );
    errors.sort_by_key(|e| (e.line, e.column));
    errors
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
    fn unknown_names_suggest_the_close_one() {
        let m = "unknown field `timout`, expected one of `id`, `timeout`, `retry`";
        assert_eq!(
            did_you_mean(m).as_deref(),
            Some("; did you mean `timeout`?")
        );
        let m = "unknown variant `grcp`, expected one of `http`, `grpc`, `amqp`, `mqtt`";
        assert_eq!(did_you_mean(m).as_deref(), Some("; did you mean `grpc`?"));
        assert_eq!(did_you_mean("unknown field `zz`, expected `id`"), None);
        assert_eq!(did_you_mean("invalid type: integer `5`"), None);
    }

    #[test]
    fn interpolates_inside_values_only() {
        assert_eq!(
            interpolate("${HOST}:${PORT:-80}/$${HOST}", &env).unwrap(),
            "10.0.0.1:80/${HOST}"
        );
        assert_eq!(interpolate("a$b", &env).unwrap(), "a$b");
        let (offset, _) = interpolate("x ${NOPE}", &env).unwrap_err();
        assert_eq!(offset, 2);
    }

    #[test]
    fn missing_variable_has_position() {
        let errs = parse(
            "f",
            "routes: []
b:  ${NOPE}
",
            &env,
        )
        .unwrap_err();
        assert_eq!((errs[0].line, errs[0].column), (2, 5), "{errs:?}");
    }

    #[test]
    fn variables_never_change_the_structure() {
        let hostile = |name: &str| match name {
            "URL" => Some(r#"http://h:1"], connect_timeout: "1ms"#.to_string()),
            "ID" => Some("a, backend: evil } # x".to_string()),
            "LIMIT" => Some("3".to_string()),
            _ => None,
        };
        let text = "backends:\n  up: { type: http, endpoints: [\"${URL}\"] }\nroutes:\n  - id: \"${ID}\"\n    match: { path: /a }\n    backend: up\n    concurrency_limit: ${LIMIT}\n";
        let (spec, _) = parse("f", text, &hostile).unwrap();
        let route = &spec.routes[0];
        assert_eq!(route.id, "a, backend: evil } # x");
        assert_eq!(route.backend, "up");
        assert_eq!(route.concurrency_limit, Some(3), "plain values are typed");
        match &spec.backends["up"] {
            crate::config::model::BackendSpec::Http(h) => {
                assert_eq!(h.endpoints, [r#"http://h:1"], connect_timeout: "1ms"#]);
                assert_eq!(h.connect_timeout.0, std::time::Duration::from_secs(2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn duplicate_keys_are_refused_where_written() {
        let errs = parse(
            "f",
            "routes: []
server:
  listen: a
  listen: b
",
            &env,
        )
        .unwrap_err();
        assert_eq!((errs[0].line, errs[0].column), (4, 3), "{errs:?}");
        assert!(errs[0].message.contains("server.listen"), "{errs:?}");
    }

    #[test]
    fn locator_finds_nodes() {
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
        assert_eq!(
            loc.styles.get("routes[0].backend"),
            Some(&TScalarStyle::Plain)
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
