//! Path templates (`/v1/orders/{id}`, `/static/{*rest}`), `google.api.http` rule templates
//! (`/v1/{name=shelves/*/books/**}:cancel`), rewrite templates and value templates
//! (`order.{region}.{body.kind}`), compiled at load time. The router matches with path and rule
//! templates; backends fill the others per request. All of them read `{…}` references with one
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
    /// A path into the verified token's claims (the `jwt` plugin's).
    Claim(Vec<String>),
    /// A fact of the client's certificate (mutual TLS): `cn`, `subject`, `dns`, `uri`,
    /// `email` (the first of each SAN kind) or `hash`.
    ClientCert(String),
    /// A value a `script` plugin set (`req.set_ctx("tenant", …)`).
    Ctx(String),
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
                    Some(("claims", c)) if c.split('.').all(|f| !f.is_empty()) => {
                        ValuePart::Claim(c.split('.').map(str::to_string).collect())
                    }
                    Some(("ctx", c)) if valid_name(c) => ValuePart::Ctx(c.to_string()),
                    Some(("client_cert", f)) => match f {
                        "cn" | "subject" | "dns" | "uri" | "email" | "hash" => {
                            ValuePart::ClientCert(f.to_string())
                        }
                        _ => {
                            return Err(format!(
                                "`{{{name}}}`: a client certificate gives `cn`, `subject`, `dns`, `uri`, `email` or `hash`"
                            ));
                        }
                    },
                    _ => {
                        return Err(format!(
                            "`{{{name}}}`: use `{{param}}`, `{{query.name}}`, `{{header.name}}`, `{{body.field.path}}`, `{{claims.name}}`, `{{client_cert.cn}}` or `{{ctx.name}}`"
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

    /// Whether it reads a token's claims.
    pub fn uses_claims(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, ValuePart::Claim(_)))
    }

    /// Whether it reads a value a script sets.
    pub fn uses_ctx(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, ValuePart::Ctx(_)))
    }

    /// Whether filling it needs the JSON body.
    pub fn needs_body(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, ValuePart::Body(_)))
    }
}

/// One segment of a [`RuleTemplate`]: a literal, `*` (one segment) or `**` (any number,
/// zero included), with the variable it belongs to, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSegment {
    pub kind: RuleKind,
    pub var: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleKind {
    Lit(String),
    Star,
    DoubleStar,
}

/// A variable of a [`RuleTemplate`]: the request field it sets and the segments it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleVar {
    pub field: String,
    pub start: usize,
    pub end: usize,
}

impl RuleVar {
    /// Whether the variable may hold several segments (`{name=shelves/*}`, `{x=**}`): its
    /// value keeps `%2F` encoded, as `google/api/http.proto` says.
    pub fn multi_segment(&self, segments: &[RuleSegment]) -> bool {
        self.end - self.start != 1 || segments[self.start].kind == RuleKind::DoubleStar
    }
}

/// A path template of a `google.api.http` rule, as `google/api/http.proto` defines it:
///
/// ```text
/// Template = "/" Segments [ Verb ] ;  Segments = Segment { "/" Segment } ;
/// Segment  = "*" | "**" | LITERAL | Variable ;  Verb = ":" LITERAL ;
/// Variable = "{" FieldPath [ "=" Segments ] "}" ;
/// ```
///
/// `**` may stand anywhere (also before more segments or a verb), once per template. The verb
/// is everything after the first `:` of the last segment, outside any variable
/// (`/{id}:verb:subverb` has the verb `verb:subverb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleTemplate {
    /// As written in the proto.
    pub raw: String,
    pub segments: Vec<RuleSegment>,
    pub vars: Vec<RuleVar>,
    pub verb: Option<String>,
}

/// A piece of a rule template's path, before variables are read.
enum RawSeg<'a> {
    Lit(String),
    Var(&'a str),
}

fn rule_segment(text: &str) -> Result<RuleKind, String> {
    match text {
        "*" => Ok(RuleKind::Star),
        "**" => Ok(RuleKind::DoubleStar),
        "" => Err("empty segment (`//`)".into()),
        t if t.contains('*') => Err(format!(
            "segment `{t}`: `*` and `**` stand alone in a segment"
        )),
        t => Ok(RuleKind::Lit(t.to_string())),
    }
}

impl RuleTemplate {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let rest = raw.strip_prefix('/').ok_or("a template starts with `/`")?;
        let mut raw_segs: Vec<RawSeg<'_>> = Vec::new();
        let mut verb = None;
        let pieces = lex(rest)?;
        let count = pieces.len();
        for (n, piece) in pieces.into_iter().enumerate() {
            match piece {
                Piece::Ref(inner) => match raw_segs.last() {
                    None => raw_segs.push(RawSeg::Var(inner)),
                    Some(RawSeg::Lit(s)) if s.is_empty() => {
                        raw_segs.pop();
                        raw_segs.push(RawSeg::Var(inner));
                    }
                    _ => return Err(format!("`{{{inner}}}`: a variable fills whole segments")),
                },
                Piece::Lit(text) => {
                    for (i, part) in text.split('/').enumerate() {
                        if i > 0 {
                            raw_segs.push(RawSeg::Lit(String::new()));
                            if let Some(RawSeg::Lit(s)) = raw_segs.last_mut() {
                                s.push_str(part);
                            }
                            continue;
                        }
                        match raw_segs.last_mut() {
                            None => raw_segs.push(RawSeg::Lit(part.to_string())),
                            Some(RawSeg::Lit(s)) => s.push_str(part),
                            Some(RawSeg::Var(_)) if part.is_empty() => {}
                            // `{name}:verb`, at the very end.
                            Some(RawSeg::Var(_))
                                if n + 1 == count
                                    && !text.contains('/')
                                    && part.len() > 1
                                    && part.starts_with(':') =>
                            {
                                verb = Some(part[1..].to_string());
                            }
                            Some(RawSeg::Var(inner)) => {
                                return Err(format!(
                                    "`{{{inner}}}{part}`: a variable fills whole segments"
                                ));
                            }
                        }
                    }
                }
            }
        }
        // A verb after a literal or wildcard last segment: from its first `:`.
        if verb.is_none()
            && let Some(RawSeg::Lit(last)) = raw_segs.last_mut()
            && let Some(i) = last.find(':')
        {
            let v = last[i + 1..].to_string();
            if v.is_empty() {
                return Err("an empty verb (`:` at the end)".into());
            }
            verb = Some(v);
            last.truncate(i);
        }
        if matches!(raw_segs.as_slice(), [RawSeg::Lit(s)] if s.is_empty()) && verb.is_none() {
            raw_segs.clear();
        }
        let mut segments = Vec::new();
        let mut vars: Vec<RuleVar> = Vec::new();
        for seg in raw_segs {
            match seg {
                RawSeg::Lit(text) => segments.push(RuleSegment {
                    kind: rule_segment(&text)?,
                    var: None,
                }),
                RawSeg::Var(inner) => {
                    let (field, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
                    if field
                        .split('.')
                        .any(|f| !valid_name(f) || f.starts_with(|c: char| c.is_ascii_digit()))
                    {
                        return Err(format!(
                            "`{{{inner}}}`: a variable names a field path like `book.name`"
                        ));
                    }
                    if vars.iter().any(|v| v.field == field) {
                        return Err(format!("field `{field}` is bound twice"));
                    }
                    let start = segments.len();
                    for part in pattern.split('/') {
                        segments.push(RuleSegment {
                            kind: rule_segment(part).map_err(|e| format!("`{{{inner}}}`: {e}"))?,
                            var: Some(vars.len()),
                        });
                    }
                    vars.push(RuleVar {
                        field: field.to_string(),
                        start,
                        end: segments.len(),
                    });
                }
            }
        }
        if segments
            .iter()
            .filter(|s| s.kind == RuleKind::DoubleStar)
            .count()
            > 1
        {
            return Err("`**` appears more than once; a template holds one at most".into());
        }
        Ok(RuleTemplate {
            raw: raw.to_string(),
            segments,
            vars,
            verb,
        })
    }

    fn double_star(&self) -> Option<usize> {
        self.segments
            .iter()
            .position(|s| s.kind == RuleKind::DoubleStar)
    }

    /// The router keys that lead to this template, each with whether it goes to the catch-all
    /// router: the path up to `**` (a catch-all), and the path with `**` taking no segment.
    /// The keys only find candidates; [`RuleTemplate::bind`] decides.
    pub fn router_keys(&self) -> Vec<(String, bool)> {
        let key = |skip_double: bool| {
            let mut out = String::new();
            let last = self.segments.len().saturating_sub(1);
            for (n, s) in self.segments.iter().enumerate() {
                match &s.kind {
                    RuleKind::DoubleStar if skip_double => continue,
                    RuleKind::DoubleStar => {
                        out.push_str(&format!("/{{*p{n}}}"));
                        return (out, true);
                    }
                    RuleKind::Star => out.push_str(&format!("/{{p{n}}}")),
                    RuleKind::Lit(l) => {
                        out.push('/');
                        out.push_str(l);
                        if n == last
                            && let Some(v) = &self.verb
                        {
                            out.push(':');
                            out.push_str(v);
                        }
                    }
                }
            }
            if out.is_empty() {
                out.push('/');
                if let Some(v) = &self.verb {
                    out.push(':');
                    out.push_str(v);
                }
            }
            (out, false)
        };
        let mut keys = vec![key(false)];
        if let Some(d) = self.double_star()
            // `**` last before a verb takes at least the verb's segment.
            && !(d + 1 == self.segments.len() && self.verb.is_some())
        {
            keys.push(key(true));
        }
        keys
    }

    /// The template's shape, for telling two templates apart: wildcards and literals, not
    /// the fields they set.
    pub fn shape(&self) -> String {
        let mut out = String::new();
        for s in &self.segments {
            out.push('/');
            match &s.kind {
                RuleKind::Lit(l) => out.push_str(l),
                RuleKind::Star => out.push('*'),
                RuleKind::DoubleStar => out.push_str("**"),
            }
        }
        if let Some(v) = &self.verb {
            out.push(':');
            out.push_str(v);
        }
        out
    }

    /// Matches a normalised request path and gives each variable's field and value, decoded as
    /// `google/api/http.proto` says: everything for a one-segment variable, everything but
    /// `%2F` for a multi-segment one. `verbs` are the custom verbs of every rule being served:
    /// a last segment ending in `:<one of them>` is that verb, never part of a variable (as in
    /// Envoy's transcoder).
    pub fn bind(
        &self,
        path: &str,
        verbs: &std::collections::HashSet<String>,
    ) -> Option<Vec<(std::sync::Arc<str>, String)>> {
        let rest = path.strip_prefix('/')?;
        let mut segs: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let asked = segs.last().and_then(|last| {
            last.match_indices(':')
                .map(|(i, _)| i)
                .find(|&i| verbs.contains(&last[i + 1..]))
        });
        match (&self.verb, asked) {
            (None, None) => {}
            (Some(v), Some(i)) => {
                let last = segs.last_mut()?;
                if last[i + 1..] != **v {
                    return None;
                }
                *last = &last[..i];
                if self.segments.is_empty() && last.is_empty() {
                    segs.pop();
                }
            }
            _ => return None,
        }
        let n = self.segments.len();
        // Which request segments each template segment takes: [from, to).
        let spans: Vec<(usize, usize)> = match self.double_star() {
            None if segs.len() == n => (0..n).map(|i| (i, i + 1)).collect(),
            None => return None,
            Some(d) => {
                let taken = segs.len().checked_sub(n - 1)?;
                (0..n)
                    .map(|i| match i.cmp(&d) {
                        std::cmp::Ordering::Less => (i, i + 1),
                        std::cmp::Ordering::Equal => (i, i + taken),
                        std::cmp::Ordering::Greater => (i + taken - 1, i + taken),
                    })
                    .collect()
            }
        };
        for (s, &(from, to)) in self.segments.iter().zip(&spans) {
            let ok = match &s.kind {
                RuleKind::Lit(l) => to == from + 1 && segs[from] == l,
                RuleKind::Star => to == from + 1 && !segs[from].is_empty(),
                RuleKind::DoubleStar => true,
            };
            if !ok {
                return None;
            }
        }
        Some(
            self.vars
                .iter()
                .map(|v| {
                    let from = spans[v.start].0;
                    let to = spans[v.end - 1].1;
                    let value = segs[from..to].join("/");
                    let value = if v.multi_segment(&self.segments) {
                        decode_keeping_slashes(&value)
                    } else {
                        percent_encoding::percent_decode_str(&value)
                            .decode_utf8_lossy()
                            .into_owned()
                    };
                    (std::sync::Arc::from(v.field.as_str()), value)
                })
                .collect(),
        )
    }
}

/// Percent-decodes all but `%2F` and `%2f`, which stay as written: a multi-segment value's
/// encoded slash is not a separator.
pub fn decode_keeping_slashes(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find("%2F").into_iter().chain(rest.find("%2f")).min() {
        out.push_str(&percent_encoding::percent_decode_str(&rest[..i]).decode_utf8_lossy());
        out.push_str(&rest[i..i + 3]);
        rest = &rest[i + 3..];
    }
    out.push_str(&percent_encoding::percent_decode_str(rest).decode_utf8_lossy());
    out
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

    fn rule(raw: &str) -> RuleTemplate {
        RuleTemplate::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn bound(raw: &str, path: &str) -> Option<Vec<(String, String)>> {
        let verbs = ["verb", "verb:subverb", "cancel", "frob"]
            .into_iter()
            .map(String::from)
            .collect();
        rule(raw)
            .bind(path, &verbs)
            .map(|v| v.into_iter().map(|(f, x)| (f.to_string(), x)).collect())
    }

    fn pairs(p: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            p.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn rule_templates_parse_as_the_spec_writes_them() {
        let t = rule("/v1/{name=shelves/*/books/**}:cancel");
        assert_eq!(t.verb.as_deref(), Some("cancel"));
        assert_eq!(t.shape(), "/v1/shelves/*/books/**:cancel");
        assert_eq!(t.vars[0].field, "name");
        assert_eq!((t.vars[0].start, t.vars[0].end), (1, 5));
        assert_eq!(
            rule("/foo/{id=*}:verb:subverb").verb.as_deref(),
            Some("verb:subverb")
        );
        assert_eq!(rule("/v1/things:batchGet").shape(), "/v1/things:batchGet");
        assert_eq!(rule("/*:verb").shape(), "/*:verb");
        assert_eq!(rule("/").shape(), "");
        assert_eq!(rule("/a/**/b").shape(), "/a/**/b");
        for bad in [
            "v1",
            "/a//b",
            "/a/{x=**}/{y=**}",
            "/a/x{y}",
            "/a/{y}x",
            "/a/{x}/{x}",
            "/a/{x=a*}",
            "/a/{1x}",
            "/a:",
            "/a/{x={y}}",
        ] {
            assert!(RuleTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rule_templates_key_the_router() {
        assert_eq!(
            rule("/v1/*/books").router_keys(),
            [("/v1/{p1}/books".into(), false)]
        );
        assert_eq!(
            rule("/**").router_keys(),
            [("/{*p0}".into(), true), ("/".into(), false)]
        );
        assert_eq!(
            rule("/v1/{name=o/**}").router_keys(),
            [("/v1/o/{*p2}".into(), true), ("/v1/o".into(), false)]
        );
        assert_eq!(
            rule("/v1/things:batchGet").router_keys(),
            [("/v1/things:batchGet".into(), false)]
        );
        assert_eq!(
            rule("/{x=**}/c:verb").router_keys(),
            [("/{*p0}".into(), true), ("/c:verb".into(), false)]
        );
        assert_eq!(
            rule("/a/**:frob").router_keys(),
            [("/a/{*p1}".into(), true)]
        );
    }

    #[test]
    fn rule_templates_bind_fields() {
        // Wildcards outside a variable bind nothing.
        assert_eq!(bound("/v1/*/books", "/v1/x/books"), pairs(&[]));
        assert_eq!(bound("/c/*/d/**", "/c/x/d/e/f"), pairs(&[]));
        assert_eq!(bound("/*:verb", "/x:verb"), pairs(&[]));
        assert_eq!(bound("/*:verb", "/x"), None);
        // `**` takes zero or more segments, also before more segments or a verb.
        assert_eq!(bound("/**", "/"), pairs(&[]));
        assert_eq!(bound("/v1/{name=o/**}", "/v1/o"), pairs(&[("name", "o")]));
        assert_eq!(
            bound("/v1/{name=o/**}", "/v1/o/p/q"),
            pairs(&[("name", "o/p/q")])
        );
        assert_eq!(bound("/a/**/b", "/a/b"), pairs(&[]));
        assert_eq!(bound("/a/**/b", "/a/x/y/b"), pairs(&[]));
        assert_eq!(bound("/a/**/b", "/a/x/y/c"), None);
        assert_eq!(
            bound("/{x=**}/c:verb", "/p/q/c:verb"),
            pairs(&[("x", "p/q")])
        );
        // Percent-decoding: all of a one-segment value; all but `%2F` of a multi-segment one.
        assert_eq!(
            bound("/v1/{id}", "/v1/a%2Fb%20c"),
            pairs(&[("id", "a/b c")])
        );
        assert_eq!(
            bound("/v1/{name=**}", "/v1/a%2Fb%20c/d%2fe"),
            pairs(&[("name", "a%2Fb c/d%2fe")])
        );
        // Verbs: as written, and a registered verb is never part of a variable.
        assert_eq!(
            bound("/foo/{id=*}:verb:subverb", "/foo/1:verb:subverb"),
            pairs(&[("id", "1")])
        );
        assert_eq!(bound("/foo/{id=*}:verb:subverb", "/foo/1:verb"), None);
        assert_eq!(bound("/v1/{name}", "/v1/x:cancel"), None);
        assert_eq!(
            bound("/v1/{name}", "/v1/x:other"),
            pairs(&[("name", "x:other")])
        );
        assert_eq!(bound("/v1/{name}:cancel", "/v1/:cancel"), None);
        assert_eq!(
            bound("/v1/{a.b}/{c}", "/v1/1/2"),
            pairs(&[("a.b", "1"), ("c", "2")])
        );
    }

    #[test]
    fn renders_templates() {
        let t = Template::parse("/api/{id}/x").unwrap();
        assert_eq!(t.vars().collect::<Vec<_>>(), vec!["id"]);
        assert_eq!(t.render(|_| Some("7")).unwrap(), "/api/7/x");
    }
}
