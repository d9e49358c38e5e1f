//! Path templates (`/v1/orders/{id}`, `/static/{*rest}`), rewrite templates and value
//! templates (`order.{region}.{body.kind}`), compiled at load time. The router matches with path
//! templates; backends fill the others per request. All three read `{…}` references with one
//! lexer, [`lex`].

/// A piece of a template: literal text, or the inside of a `{…}` reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece<'a> {
    Lit(&'a str),
    Ref(&'a str),
}

/// The one lexer of every template: literal text and `{…}` references. A `{` without its `}`,
/// or a `}` without its `{`, is an error.
fn lex(raw: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = raw;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            if rest[..open].contains('}') {
                return Err("unmatched `}` in template".into());
            }
            pieces.push(Piece::Lit(&rest[..open]));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err("unclosed `{` in template".into());
        };
        pieces.push(Piece::Ref(&rest[open + 1..open + close]));
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') {
        return Err("unmatched `}` in template".into());
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest));
    }
    Ok(pieces)
}

/// One `/`-separated segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Static(String),
    Param(String),
    CatchAll(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    pub raw: String,
    pub segments: Vec<Segment>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl PathTemplate {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let Some(rest) = raw.strip_prefix('/') else {
            return Err("a path template starts with `/`".into());
        };
        let mut segments = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() {
            vec![]
        } else {
            rest.split('/').collect()
        };
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let whole = |e: String| {
                format!(
                    "segment `{part}`: a variable must fill a whole segment, like `/{{id}}` ({e})"
                )
            };
            let pieces = lex(part).map_err(whole)?;
            if let [Piece::Ref(inner)] = pieces[..] {
                if let Some(name) = inner.strip_prefix('*') {
                    if !valid_name(name) {
                        return Err(format!(
                            "`{{*{name}}}`: a variable name uses letters, digits and `_`"
                        ));
                    }
                    if !last {
                        return Err(format!(
                            "the catch-all `{{*{name}}}` must be the last segment"
                        ));
                    }
                    segments.push(Segment::CatchAll(name.to_string()));
                } else {
                    if !valid_name(inner) {
                        return Err(format!(
                            "`{{{inner}}}`: a variable name uses letters, digits and `_`"
                        ));
                    }
                    segments.push(Segment::Param(inner.to_string()));
                }
            } else if pieces.iter().any(|p| matches!(p, Piece::Ref(_))) {
                return Err(format!(
                    "segment `{part}`: a variable must fill a whole segment, like `/{{id}}`"
                ));
            } else if part.is_empty() && !last {
                return Err("empty segment (`//`) in a path template".into());
            } else if *part == "." || *part == ".." {
                return Err(format!(
                    "segment `{part}` can never match a normalised path"
                ));
            } else if part.contains(['?', '#']) {
                return Err("a path template holds no query (`?`) or fragment (`#`)".into());
            } else {
                segments.push(Segment::Static(part.to_string()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for n in segments.iter().filter_map(|s| match s {
            Segment::Param(n) | Segment::CatchAll(n) => Some(n),
            Segment::Static(_) => None,
        }) {
            if !seen.insert(n) {
                return Err(format!("variable `{n}` appears twice"));
            }
        }
        Ok(PathTemplate {
            raw: raw.to_string(),
            segments,
        })
    }

    pub fn ends_with_catch_all(&self) -> bool {
        matches!(self.segments.last(), Some(Segment::CatchAll(_)))
    }

    /// Names of the variables, in order.
    pub fn captures(&self) -> Vec<&str> {
        self.segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param(n) | Segment::CatchAll(n) => Some(n.as_str()),
                Segment::Static(_) => None,
            })
            .collect()
    }

    /// The key under which the router stores this template: variables renamed by position,
    /// so `/a/{id}` and `/a/{x}` are recognised as the same shape.
    pub fn router_key(&self) -> String {
        let mut out = String::new();
        let mut n = 0;
        for s in &self.segments {
            out.push('/');
            match s {
                Segment::Static(t) => out.push_str(t),
                Segment::Param(_) => {
                    out.push_str(&format!("{{p{n}}}"));
                    n += 1;
                }
                Segment::CatchAll(_) => {
                    out.push_str(&format!("{{*p{n}}}"));
                    n += 1;
                }
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

/// A string with `{name}` references to captured variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    Var(String),
}

impl Template {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let parts = lex(raw)?
            .into_iter()
            .map(|p| match p {
                Piece::Lit(l) => Ok(Part::Lit(l.to_string())),
                Piece::Ref(r) => {
                    let name = r.trim_start_matches('*');
                    if valid_name(name) {
                        Ok(Part::Var(name.to_string()))
                    } else {
                        Err(format!(
                            "`{{{name}}}`: a variable name uses letters, digits and `_`"
                        ))
                    }
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Template { parts })
    }

    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// Fills the template; `lookup` returns a variable's value.
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Var(v) => out.push_str(lookup(v)?),
            }
        }
        Some(out)
    }
}

/// A template over request values, for names the message bridges build (exchanges, routing
/// keys, topics): `{param}` (a path capture), `{query.name}`, `{header.name}` and `{body.a.b}`
/// (a field of the JSON body). Parsed when the config loads; filled per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueTemplate {
    pub parts: Vec<ValuePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValuePart {
    Lit(String),
    Param(String),
    Query(String),
    /// A header name, lower-cased.
    Header(String),
    /// A path into the JSON body.
    Body(Vec<String>),
}

impl ValueTemplate {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let parts = lex(raw)?
            .into_iter()
            .map(|p| {
                let name = match p {
                    Piece::Lit(l) => return Ok(ValuePart::Lit(l.to_string())),
                    Piece::Ref(name) => name,
                };
                Ok(match name.split_once('.') {
                    None if valid_name(name) => ValuePart::Param(name.to_string()),
                    Some(("query", q)) if !q.is_empty() && !q.contains('{') => {
                        ValuePart::Query(q.to_string())
                    }
                    Some(("header", h))
                        if !h.is_empty()
                            && h.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
                    {
                        ValuePart::Header(h.to_ascii_lowercase())
                    }
                    Some(("body", b)) if b.split('.').all(|f| !f.is_empty()) => {
                        ValuePart::Body(b.split('.').map(str::to_string).collect())
                    }
                    _ => {
                        return Err(format!(
                            "`{{{name}}}`: use `{{param}}`, `{{query.name}}`, `{{header.name}}` or `{{body.field.path}}`"
                        ));
                    }
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(ValueTemplate { parts })
    }

    /// The path captures the template uses.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            ValuePart::Param(v) => Some(v.as_str()),
            _ => None,
        })
    }

    /// Whether filling it needs the JSON body.
    pub fn needs_body(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, ValuePart::Body(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_templates_name_their_sources() {
        let t = ValueTemplate::parse("order.{region}.{query.kind}.{header.X-Tenant}.{body.a.b}")
            .unwrap();
        assert_eq!(
            t.parts,
            vec![
                ValuePart::Lit("order.".into()),
                ValuePart::Param("region".into()),
                ValuePart::Lit(".".into()),
                ValuePart::Query("kind".into()),
                ValuePart::Lit(".".into()),
                ValuePart::Header("x-tenant".into()),
                ValuePart::Lit(".".into()),
                ValuePart::Body(vec!["a".into(), "b".into()]),
            ]
        );
        assert!(t.needs_body());
        assert_eq!(t.params().collect::<Vec<_>>(), ["region"]);
        for bad in [
            "{body.}",
            "{cookie.x}",
            "{a",
            "b}",
            "{header.a b}",
            "{query.{x}",
            "a}b{c}",
        ] {
            assert!(ValueTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_and_keys_templates() {
        let t = PathTemplate::parse("/v1/orders/{id}/items/{*rest}").unwrap();
        assert_eq!(t.captures(), vec!["id", "rest"]);
        assert_eq!(t.router_key(), "/v1/orders/{p0}/items/{*p1}");
        assert!(PathTemplate::parse("v1").is_err());
        assert!(PathTemplate::parse("/a/{*x}/b").is_err());
        assert!(PathTemplate::parse("/a/x{y}").is_err());
        assert!(PathTemplate::parse("/a/{y}/{y}").is_err());
        for whole in ["/a/x{y}", "/a/{y}x", "/a/{y", "/a/y}"] {
            let e = PathTemplate::parse(whole).unwrap_err();
            assert!(e.contains("must fill a whole segment"), "{whole}: {e}");
        }
        assert_eq!(PathTemplate::parse("/").unwrap().router_key(), "/");
    }

    #[test]
    fn renders_templates() {
        let t = Template::parse("/api/{id}/x").unwrap();
        assert_eq!(t.vars().collect::<Vec<_>>(), vec!["id"]);
        assert_eq!(t.render(|_| Some("7")).unwrap(), "/api/7/x");
    }
}
