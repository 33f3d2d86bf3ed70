//! Generic strict YAML config loader.
//!
//! One serde tree, mirrored 1:1 by YAML. Every problem (YAML syntax, unknown key, wrong
//! type, missing key, unknown enum variant, semantic issue) becomes a [`ConfigError`] entry
//! that names the file, line and column (1-based) of the offending key or value, the full
//! dotted key path (`layers[2].hidden`) and, where possible, a "did you mean" hint.
//!
//! Positions come from a position-aware parse of the YAML text ([`ConfigDoc::locate`]),
//! not from the deserializer: serde buffers internally tagged enums and `flatten` and
//! loses positions there, so the failing key path is reconstructed from the error and the
//! YAML tree, then looked up in the position table.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use saphyr_parser::{Event, Parser, Span};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

/// Process exit code for any configuration error.
pub const EXIT_CODE: i32 = 2;

/// A 1-based line and column in the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Where a reported problem comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum At {
    /// A position in the config file.
    File(Location),
    /// A `--set` override (the raw `key=value` string).
    Override(String),
    /// The key is absent from the file: a default applied.
    Default,
    /// Only the file is known.
    Nowhere,
}

/// One problem in a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    pub at: At,
    /// Full dotted key path (`model.moe.top_k`, `layers[2].hidden`); empty for the root.
    pub path: String,
    pub message: String,
}

/// All problems found in a config; print it to stderr and exit with [`EXIT_CODE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name used in messages.
    pub origin: String,
    pub issues: Vec<ConfigIssue>,
}

impl ConfigError {
    fn one(origin: &str, at: At, path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.to_string(),
            issues: vec![ConfigIssue {
                at,
                path: path.into(),
                message: message.into(),
            }],
        }
    }

    /// The process exit code for configuration errors (2).
    pub fn exit_code(&self) -> i32 {
        EXIT_CODE
    }
}

impl ConfigIssue {
    /// The printed line: `file:line:col: path: message`, `--set k=v: path: message`,
    /// `file: (default): path: message` or `file: path: message`.
    pub fn render(&self, origin: &str) -> String {
        let place = match &self.at {
            At::File(loc) => format!("{origin}:{loc}"),
            At::Override(raw) => format!("--set {raw}"),
            At::Default => format!("{origin}: (default)"),
            At::Nowhere => origin.to_string(),
        };
        if self.path.is_empty() {
            format!("{place}: {}", self.message)
        } else {
            format!("{place}: {}: {}", self.path, self.message)
        }
    }
}

impl fmt::Display for ConfigError {
    /// One line per issue.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&issue.render(&self.origin))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Position of one node of the YAML text.
#[derive(Clone, Copy, Debug)]
struct NodePos {
    /// Where the key is written (None for sequence items and the root).
    key: Option<Location>,
    /// Where the value starts.
    value: Location,
}

/// A parsed config document: the YAML tree after overrides, plus the positions of every
/// key path in the file text and the overrides that were applied.
#[derive(Clone, Debug)]
pub struct ConfigDoc {
    origin: String,
    value: Value,
    positions: Positions,
    /// (canonical key path, raw override) in application order.
    overrides: Vec<(String, String)>,
}

/// Read a config file, apply `--set` overrides and deserialize it (no semantic checks; the
/// binary uses [`load_config_checked`]).
#[cfg(test)]
pub fn load_config<T: DeserializeOwned + Serialize>(
    path: &Path,
    overrides: &[String],
) -> Result<T, ConfigError> {
    ConfigDoc::read(path, overrides)?.deserialize()
}

/// Like [`load_config`] on text; `origin` is the file name used in messages.
#[cfg(test)]
pub fn load_config_str<T: DeserializeOwned + Serialize>(
    text: &str,
    origin: &str,
    overrides: &[String],
) -> Result<T, ConfigError> {
    ConfigDoc::parse(text, origin, overrides)?.deserialize()
}

/// Load, deserialize, then run `check`, which may complete the config (e.g. resolve its
/// paths; its second argument says whether a key path was set by a `--set` override) and
/// returns the semantic issues `(key path, message)`; all of them are reported at once,
/// located in the file.
pub fn load_config_checked<T: DeserializeOwned + Serialize>(
    path: &Path,
    overrides: &[String],
    check: impl FnOnce(&mut T, &dyn Fn(&str) -> bool) -> Vec<(String, String)>,
) -> Result<T, ConfigError> {
    let doc = ConfigDoc::read(path, overrides)?;
    let mut cfg = doc.deserialize()?;
    let issues = check(&mut cfg, &|key| doc.override_covering(key).is_some());
    doc.validate(issues)?;
    Ok(cfg)
}

/// The resolved config (after overrides and defaults) as YAML.
pub fn resolved_yaml<T: Serialize>(cfg: &T) -> String {
    serde_yaml::to_string(cfg).unwrap_or_else(|e| format!("# cannot serialize config: {e}\n"))
}

impl ConfigDoc {
    /// Read and parse a config file and apply overrides.
    pub fn read(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        use std::io::Read;
        let origin = path.display().to_string();
        let cannot = |e: std::io::Error| {
            ConfigError::one(&origin, At::Nowhere, "", format!("cannot read config: {e}"))
        };
        // One byte past the limit is enough to refuse it (the file may be endless).
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(cannot)?
            .take(limits::FILE_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .map_err(cannot)?;
        Self::parse(&text, &origin, overrides)
    }

    /// Parse config text (`origin` names it in messages) and apply overrides.
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        if text.len() > limits::FILE_BYTES {
            return Err(ConfigError::one(
                origin,
                At::Nowhere,
                "",
                format!(
                    "config exceeds the loader's limit of {} bytes; configs are a few KiB",
                    limits::FILE_BYTES
                ),
            ));
        }
        // Limits first: yaml_serde would build the whole expanded tree.
        let positions = positions(text)
            .map_err(|(at, message)| ConfigError::one(origin, At::File(at), "", message))?;
        let mut value: Value = serde_yaml::from_str(text).map_err(|e| syntax_error(origin, &e))?;
        value
            .apply_merge()
            .map_err(|e| ConfigError::one(origin, At::Nowhere, "", e.to_string()))?;
        let mut doc = ConfigDoc {
            origin: origin.to_string(),
            value,
            positions,
            overrides: Vec::new(),
        };
        let mut issues = Vec::new();
        for raw in overrides {
            if let Err(message) = doc.apply_override(raw) {
                issues.push(ConfigIssue {
                    at: At::Override(raw.clone()),
                    path: String::new(),
                    message,
                });
            }
        }
        if issues.is_empty() {
            Ok(doc)
        } else {
            Err(ConfigError {
                origin: origin.to_string(),
                issues,
            })
        }
    }

    /// Where the key of `key_path` (`model.moe.top_k`, `layers[1].hidden`) is written in
    /// the file; for sequence items and the root, where the value starts.
    pub fn locate(&self, key_path: &str) -> Option<Location> {
        self.positions
            .get(key_path)
            .map(|p| p.key.unwrap_or(p.value))
    }

    /// Where the value of `key_path` starts in the file.
    pub fn locate_value(&self, key_path: &str) -> Option<Location> {
        self.positions.get(key_path).map(|p| p.value)
    }

    /// Turn semantic issues `(full dotted key path, message)` into one error listing them
    /// all, each located at its key in the file, at the override that set it, or marked
    /// `(default)` when the key is absent from the file.
    pub fn validate(&self, issues: Vec<(String, String)>) -> Result<(), ConfigError> {
        if issues.is_empty() {
            return Ok(());
        }
        let issues = issues
            .into_iter()
            .map(|(path, message)| ConfigIssue {
                at: self.where_is(&path, false).unwrap_or(At::Default),
                path,
                message,
            })
            .collect();
        Err(ConfigError {
            origin: self.origin.clone(),
            issues,
        })
    }

    /// Deserialize the (overridden) tree into `T`, turning the first serde error into a
    /// located [`ConfigError`].
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(&self.value).map_err(|e| {
            let path = canonical_path(e.path());
            let message = e.inner().to_string();
            self.serde_error(&path, &message)
        })
    }

    /// Where a key path is set: an override covering it, its key/value in the file, or an
    /// override below it. None when it is in neither.
    fn where_is(&self, path: &str, value: bool) -> Option<At> {
        if let Some(raw) = self.override_covering(path) {
            return Some(At::Override(raw.to_string()));
        }
        let loc = if value {
            self.locate_value(path)
        } else {
            self.locate(path)
        };
        if let Some(loc) = loc {
            return Some(At::File(loc));
        }
        self.overrides
            .iter()
            .find(|(o, _)| is_under(o, path))
            .map(|(_, raw)| At::Override(raw.clone()))
    }

    /// Like [`Self::where_is`], falling back to the nearest located ancestor.
    fn where_is_or_parent(&self, path: &str, value: bool) -> At {
        if let Some(at) = self.where_is(path, value) {
            return at;
        }
        let mut p = path;
        while let Some(parent) = parent_path(p) {
            if let Some(at) = self.where_is(parent, false) {
                return at;
            }
            p = parent;
        }
        At::Nowhere
    }

    /// The last override whose path is `path` or an ancestor of it.
    fn override_covering(&self, path: &str) -> Option<&str> {
        self.overrides
            .iter()
            .rev()
            .find(|(o, _)| is_under(path, o))
            .map(|(_, raw)| raw.as_str())
    }

    fn serde_error(&self, path: &str, message: &str) -> ConfigError {
        let (path, at, message) = self.explain(path, message);
        ConfigError::one(&self.origin, at, path, message)
    }

    /// Full key path, location and message for a serde error at `path`.
    fn explain(&self, path: &str, message: &str) -> (String, At, String) {
        let node = value_at(&self.value, path);
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let name = rest.split('`').next().unwrap_or_default();
            let expected = expected_names(message);
            // serde_path_to_error already includes the key when it saw it directly.
            let direct = parent_path(path)
                .filter(|parent| join(parent, name) == path)
                .and_then(|parent| value_at(&self.value, parent))
                .is_some_and(|p| matches!(p, Value::Mapping(m) if m.contains_key(name)));
            let full = if direct {
                path.to_string()
            } else {
                // Inside a buffered (tagged / flattened) node the path stops at that
                // node: find the map below it that holds the unknown key.
                node.and_then(|n| find_map_with_key(n, path, name, &expected))
                    .unwrap_or_else(|| join(path, name))
            };
            let at = self.where_is_or_parent(&full, false);
            return (full, at, hint("unknown key", name, &expected));
        }
        if let Some(rest) = message.strip_prefix("unknown variant `") {
            let name = rest.split('`').next().unwrap_or_default();
            let expected = expected_names(message);
            let (full, value) = node
                .and_then(|n| find_variant(n, path, name))
                .unwrap_or((path.to_string(), true));
            let at = self.where_is_or_parent(&full, value);
            let msg = hint(&format!("unknown variant `{name}`"), name, &expected);
            return (full, at, msg);
        }
        if let Some(rest) = message.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or_default();
            let lacks = matches!(node, Some(Value::Mapping(m)) if !m.contains_key(name))
                || matches!(node, Some(Value::Null));
            if lacks || node.is_none() {
                let at = if path.is_empty() {
                    self.locate_value("").map(At::File).unwrap_or(At::Nowhere)
                } else {
                    self.where_is_or_parent(path, false)
                };
                return (join(path, name), at, "missing required key".to_string());
            }
            let at = self.where_is_or_parent(path, false);
            let msg = format!("missing required key `{name}` in a nested entry");
            return (path.to_string(), at, msg);
        }
        if let Some(rest) = message.strip_prefix("duplicate field `") {
            let name = rest.split('`').next().unwrap_or_default();
            let full = join(path, name);
            let at = self.where_is_or_parent(&full, false);
            return (full, at, "duplicate key".to_string());
        }
        // Type and value errors: point at the value. When the error describes a scalar but
        // the node at `path` is a map or sequence, serde buffered it: search below for it.
        let mut full = path.to_string();
        if let Some(rest) = message.strip_prefix("invalid type: ") {
            let unexpected = rest.split(", expected").next().unwrap_or_default();
            if let Some(p) = node
                .filter(|n| !kind_matches(n, unexpected))
                .and_then(|n| find_described(n, path, unexpected))
            {
                full = p;
            }
        }
        let at = self.where_is_or_parent(&full, true);
        (full, at, message.to_string())
    }

    /// Apply one `key.path=value` override to the tree.
    fn apply_override(&mut self, raw: &str) -> Result<(), String> {
        let Some((key, val)) = raw.split_once('=') else {
            return Err("malformed override: expected `key.path=value`".to_string());
        };
        let segs = parse_key_path(key.trim())?;
        let new: Value = serde_yaml::from_str(val)
            .map_err(|e| format!("invalid YAML value `{val}`: {}", strip_mark(&e.to_string())))?;
        let mut cur = &mut self.value;
        let mut walked = String::new();
        for seg in &segs {
            if cur.is_null() && matches!(seg, Seg::Key(_)) {
                *cur = Value::Mapping(Mapping::new());
            }
            let here = if walked.is_empty() {
                "the root".to_string()
            } else {
                format!("`{walked}`")
            };
            cur = match (seg, cur) {
                (Seg::Key(k), Value::Mapping(m)) => {
                    let k = Value::String(k.clone());
                    if !m.contains_key(&k) {
                        m.insert(k.clone(), Value::Null);
                    }
                    m.get_mut(&k).expect("just inserted")
                }
                (Seg::Index(i), Value::Sequence(s)) => {
                    let len = s.len();
                    s.get_mut(*i).ok_or_else(|| {
                        format!("index {i} out of range: {here} has {len} entries")
                    })?
                }
                (Seg::Key(k), other) => {
                    return Err(format!(
                        "cannot set key `{k}`: {here} is {}, not a map",
                        kind_name(other)
                    ));
                }
                (Seg::Index(i), other) => {
                    return Err(format!(
                        "cannot index [{i}]: {here} is {}, not a sequence",
                        kind_name(other)
                    ));
                }
            };
            walked = match seg {
                Seg::Key(k) => join(&walked, k),
                Seg::Index(i) => format!("{walked}[{i}]"),
            };
        }
        *cur = new;
        // A later override replaces what earlier ones set below it.
        self.overrides.retain(|(o, _)| !is_under(o, &walked));
        self.overrides.push((walked, raw.to_string()));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Key paths

#[derive(Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Parse `a.b[2].c` into segments.
fn parse_key_path(s: &str) -> Result<Vec<Seg>, String> {
    if s.is_empty() {
        return Err("malformed override: empty key path".to_string());
    }
    let mut segs = Vec::new();
    for part in s.split('.') {
        let (name, mut idx) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name.is_empty() && (segs.is_empty() || idx.is_empty()) {
            return Err(format!("malformed override: empty key in path `{s}`"));
        }
        if !name.is_empty() {
            segs.push(Seg::Key(name.to_string()));
        }
        while !idx.is_empty() {
            let close = idx
                .find(']')
                .ok_or_else(|| format!("malformed override: unclosed `[` in `{s}`"))?;
            let n = idx[1..close]
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("malformed override: bad index in `{s}`"))?;
            segs.push(Seg::Index(n));
            idx = &idx[close + 1..];
            if !idx.is_empty() && !idx.starts_with('[') {
                return Err(format!("malformed override: bad index in `{s}`"));
            }
        }
    }
    Ok(segs)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `path` equals `ancestor` or lies below it.
fn is_under(path: &str, ancestor: &str) -> bool {
    if ancestor.is_empty() {
        return true;
    }
    match path.strip_prefix(ancestor) {
        Some(rest) => rest.is_empty() || rest.starts_with('.') || rest.starts_with('['),
        None => false,
    }
}

fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    Some(match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    })
}

fn canonical_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => out = join(&out, key),
            Segment::Unknown => {}
        }
    }
    out
}

fn key_string(k: &Value) -> Option<String> {
    match k {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The node at a canonical key path.
fn value_at<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(root);
    }
    let segs = parse_key_path(path).ok()?;
    let mut cur = root;
    for seg in segs {
        cur = match (seg, cur) {
            (Seg::Key(k), Value::Mapping(m)) => {
                m.iter()
                    .find(|(mk, _)| key_string(mk).as_deref() == Some(k.as_str()))?
                    .1
            }
            (Seg::Index(i), Value::Sequence(s)) => s.get(i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// All nodes below (and including) `node`, breadth-first, with their paths.
fn walk<'a>(node: &'a Value, path: &str) -> Vec<(String, &'a Value)> {
    let mut out = vec![(path.to_string(), node)];
    let mut i = 0;
    while i < out.len() {
        let (p, n) = (out[i].0.clone(), out[i].1);
        match n {
            Value::Mapping(m) => {
                for (k, v) in m {
                    if let Some(k) = key_string(k) {
                        out.push((join(&p, &k), v));
                    }
                }
            }
            Value::Sequence(s) => {
                for (j, v) in s.iter().enumerate() {
                    out.push((format!("{p}[{j}]"), v));
                }
            }
            Value::Tagged(t) => out.push((p, &t.value)),
            _ => {}
        }
        i += 1;
    }
    out
}

/// The path of the map below `node` that holds `name` and best fits the expected fields.
fn find_map_with_key(node: &Value, path: &str, name: &str, expected: &[String]) -> Option<String> {
    let mut best: Option<(f64, String)> = None;
    for (p, n) in walk(node, path) {
        let Value::Mapping(m) = n else { continue };
        let keys: Vec<String> = m.keys().filter_map(key_string).collect();
        if !keys.iter().any(|k| k == name) {
            continue;
        }
        let fit = keys.iter().filter(|k| expected.contains(k)).count() as f64 / keys.len() as f64;
        if best.as_ref().is_none_or(|(f, _)| fit > *f) {
            best = Some((fit, join(&p, name)));
        }
    }
    best.map(|(_, p)| p)
}

/// Path of the unknown variant `name` below `node`; the bool tells whether to point at the
/// value (a tag value or a plain string) rather than at a key (externally tagged).
fn find_variant(node: &Value, path: &str, name: &str) -> Option<(String, bool)> {
    for (p, n) in walk(node, path) {
        match n {
            Value::String(s) if s == name => return Some((p, true)),
            Value::Mapping(m) => {
                for (k, v) in m {
                    let Some(k) = key_string(k) else { continue };
                    if matches!(v, Value::String(s) if s == name) {
                        return Some((join(&p, &k), true));
                    }
                    if k == name && p == path {
                        return Some((join(&p, &k), false));
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// Does the kind of `node` agree with serde's description of an unexpected value?
fn kind_matches(node: &Value, unexpected: &str) -> bool {
    match node {
        Value::Mapping(_) => unexpected == "map",
        Value::Sequence(_) => unexpected == "sequence",
        Value::Tagged(_) => true,
        _ => unexpected != "map" && unexpected != "sequence",
    }
}

/// The first node below `node` that serde would describe as `unexpected`.
fn find_described(node: &Value, path: &str, unexpected: &str) -> Option<String> {
    let ticked = || unexpected.split('`').nth(1).unwrap_or_default();
    walk(node, path)
        .into_iter()
        .skip(1)
        .find(|(_, n)| match n {
            Value::String(s) => unexpected == format!("string {s:?}"),
            Value::Bool(b) => unexpected == format!("boolean `{b}`"),
            Value::Null => unexpected == "unit value",
            Value::Number(num) => {
                (unexpected.starts_with("integer") || unexpected.starts_with("floating point"))
                    && ticked().parse::<f64>().ok() == num.as_f64()
            }
            Value::Mapping(_) => unexpected == "map",
            Value::Sequence(_) => unexpected == "sequence",
            Value::Tagged(_) => false,
        })
        .map(|(p, _)| p)
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a map",
        Value::Tagged(_) => "a tagged value",
    }
}

// ---------------------------------------------------------------------------------------
// Messages and hints

/// Names listed after "expected" in a serde message (`expected one of `a`, `b``).
fn expected_names(message: &str) -> Vec<String> {
    let Some((_, tail)) = message.split_once(", expected ") else {
        return Vec::new();
    };
    tail.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn hint(what: &str, name: &str, expected: &[String]) -> String {
    if let Some(best) = did_you_mean(name, expected) {
        format!("{what}; did you mean `{best}`?")
    } else if expected.is_empty() {
        format!("{what}; nothing is allowed here")
    } else {
        let list: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
        format!("{what}; expected one of {}", list.join(", "))
    }
}

/// The closest candidate within an edit distance of max(2, len/3).
pub fn did_you_mean<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(2);
    candidates
        .iter()
        .map(|c| (edit_distance(&name.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

/// Optimal string alignment (restricted Damerau-Levenshtein) distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// Remove yaml_serde's " at line L column C" / " at position N" suffix.
fn strip_mark(msg: &str) -> String {
    for pat in [" at line ", " at position "] {
        if let Some(i) = msg.find(pat) {
            let rest = &msg[i + pat.len()..];
            let tail = rest
                .split_once(", ")
                .map(|(_, t)| format!(", {t}"))
                .unwrap_or_default();
            return format!("{}{tail}", &msg[..i]);
        }
    }
    msg.to_string()
}

fn syntax_error(origin: &str, e: &serde_yaml::Error) -> ConfigError {
    let at = e
        .location()
        .map(|l| {
            At::File(Location {
                line: l.line(),
                column: l.column(),
            })
        })
        .unwrap_or(At::Nowhere);
    ConfigError::one(
        origin,
        at,
        "",
        format!("invalid YAML: {}", strip_mark(&e.to_string())),
    )
}

// ---------------------------------------------------------------------------------------
// Position-aware parse

enum Frame {
    Map {
        path: String,
        key: Option<(String, Location)>,
    },
    Seq {
        path: String,
        next: usize,
    },
    /// A complex (non-scalar) key, or nodes inside it: not recorded.
    Ignore,
}

fn loc(span: &Span) -> Location {
    Location {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

/// Role of a new node: Some((path, key location)) when it is a value to record, None when
/// it is a map key (remembered in its frame) or inside a complex key.
fn node_role(
    stack: &mut [Frame],
    scalar: Option<&str>,
    here: Location,
) -> Option<(String, Option<Location>)> {
    match stack.last_mut() {
        None => Some((String::new(), None)),
        Some(Frame::Ignore) => None,
        Some(Frame::Seq { path, next }) => {
            let p = format!("{path}[{next}]");
            *next += 1;
            Some((p, None))
        }
        Some(Frame::Map { path, key }) => match key.take() {
            Some((k, kloc)) => Some((join(path, &k), Some(kloc))),
            None => {
                *key = Some((scalar.unwrap_or("?").to_string(), here));
                None
            }
        },
    }
}

/// What a config file may make the loader do. The position scan checks them in one pass
/// over the YAML events before yaml_serde builds its tree (its own guards, a nesting depth
/// of 128 and at most 100 alias replays per event, still let a kilobyte of nested anchors
/// expand to 10^8 nodes). Shipped configs are a few hundred nodes and a few KiB.
pub mod limits {
    /// Bytes of the config file.
    pub const FILE_BYTES: usize = 1 << 20;
    /// Nesting depth of maps and sequences.
    pub const DEPTH: usize = 64;
    /// Nodes (scalars, keys included, maps and sequences) after every alias is expanded:
    /// the size of the tree yaml_serde builds.
    pub const NODES: u64 = 100_000;
    /// Bytes of scalar text after every alias is expanded.
    pub const SCALAR_BYTES: u64 = 8 << 20;
    /// Bytes of all key paths (`model.moe.top_k`) written in the file, which the position
    /// table stores (long keys nested deep multiply).
    pub const PATH_BYTES: usize = 8 << 20;
    /// Alias and merge-key redirections followed to locate one key path.
    pub const REDIRECTS: usize = 64;
    /// Table lookups spent locating one key path (merge keys with several sources branch).
    pub const LOOKUPS: usize = 4096;
}

/// Where every node written in the file is, and where the nodes reached through an alias
/// or a merge key come from. Alias copies are never materialised: a path below an alias is
/// looked up below its anchor, a key merged into a map below its merge sources.
#[derive(Clone, Debug, Default)]
struct Positions {
    /// Every node written in the file (alias nodes included), by key path.
    nodes: HashMap<String, NodePos>,
    /// Alias node path -> path of the anchored node it repeats.
    aliases: HashMap<String, String>,
}

/// A loader limit that a config exceeds: (where, message).
type LimitHit = (Location, String);

fn limit_hit(here: Location, what: &str, limit: impl fmt::Display) -> LimitHit {
    (
        here,
        format!(
            "config exceeds the loader's limit of {limit} {what}; configs are small trees: \
             write the values out instead of repeating anchors (`&a`) and aliases (`*a`), \
             and nest less"
        ),
    )
}

impl Positions {
    fn get(&self, path: &str) -> Option<NodePos> {
        let mut lookups = limits::LOOKUPS;
        self.resolve(path, limits::REDIRECTS, &mut lookups)
    }

    /// Walks `path` from the root through the nodes written in the file; where it leaves
    /// them, follows the alias it passes through or the merge sources of the map it left.
    fn resolve(&self, path: &str, redirects: usize, lookups: &mut usize) -> Option<NodePos> {
        if *lookups == 0 {
            return None;
        }
        *lookups -= 1;
        if let Some(pos) = self.nodes.get(path) {
            return Some(*pos);
        }
        let redirects = redirects.checked_sub(1)?;
        let mut parent = 0;
        let cuts = path
            .char_indices()
            .filter(|&(i, c)| i > 0 && (c == '.' || c == '['))
            .map(|(i, _)| i);
        for cut in cuts.chain([path.len()]) {
            let prefix = &path[..cut];
            if let Some(anchor) = self.aliases.get(prefix) {
                return self.resolve(&rebase(anchor, path, cut), redirects, lookups);
            }
            if !self.nodes.contains_key(prefix) {
                // `path` leaves the file's nodes below `path[..parent]`: a merged key?
                let merging = &path[..parent];
                let source = join(merging, "<<");
                let sources = std::iter::once(source.clone()).chain(
                    (0..)
                        .map(|i| format!("{source}[{i}]"))
                        .take_while(|item| self.nodes.contains_key(item)),
                );
                for source in sources {
                    if self.nodes.contains_key(&source)
                        && let Some(pos) =
                            self.resolve(&rebase(&source, path, parent), redirects, lookups)
                    {
                        return Some(pos);
                    }
                }
                return None;
            }
            parent = cut;
        }
        None
    }
}

/// `path` with its first `cut` bytes replaced by `prefix`.
fn rebase(prefix: &str, path: &str, cut: usize) -> String {
    let rest = &path[cut..];
    if cut == 0 {
        join(prefix, rest)
    } else {
        format!("{prefix}{rest}")
    }
}

/// Running size of the document with every alias expanded.
#[derive(Clone, Copy, Default)]
struct Expanded {
    nodes: u64,
    scalar_bytes: u64,
}

impl Expanded {
    fn add(&mut self, other: Expanded, here: Location) -> Result<(), LimitHit> {
        self.nodes = self.nodes.saturating_add(other.nodes);
        self.scalar_bytes = self.scalar_bytes.saturating_add(other.scalar_bytes);
        if self.nodes > limits::NODES {
            return Err(limit_hit(
                here,
                "nodes after alias expansion",
                limits::NODES,
            ));
        }
        if self.scalar_bytes > limits::SCALAR_BYTES {
            return Err(limit_hit(
                here,
                "bytes of scalar text after alias expansion",
                limits::SCALAR_BYTES,
            ));
        }
        Ok(())
    }

    fn since(self, start: Expanded) -> Expanded {
        Expanded {
            nodes: self.nodes - start.nodes,
            scalar_bytes: self.scalar_bytes - start.scalar_bytes,
        }
    }
}

/// Position of every key path in the YAML text, checking the [`limits`] on the way (one
/// pass, linear in the text). Best effort otherwise: on a parse error the positions found
/// before it are kept (yaml_serde reports the error itself).
fn positions(text: &str) -> Result<Positions, LimitHit> {
    let mut out = Positions::default();
    // Anchor id -> (path of the anchored node, None inside a complex key; its size with
    // aliases expanded).
    let mut anchors: HashMap<usize, (Option<String>, Expanded)> = HashMap::new();
    let mut stack: Vec<Frame> = Vec::new();
    // Per open collection: its anchor id (0: none), path and the running size before it.
    let mut open: Vec<(usize, Option<String>, Expanded)> = Vec::new();
    let mut size = Expanded::default();
    let mut path_bytes = 0usize;
    let mut docs = 0;
    let mut record = |out: &mut Positions, p: String, pos: NodePos| {
        path_bytes = path_bytes.saturating_add(p.len());
        if path_bytes > limits::PATH_BYTES {
            return Err(limit_hit(
                pos.value,
                "bytes of key paths",
                limits::PATH_BYTES,
            ));
        }
        out.nodes.insert(p, pos);
        Ok(())
    };
    for ev in Parser::new_from_str(text) {
        let Ok((ev, span)) = ev else { break };
        let here = loc(&span);
        match ev {
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    break;
                }
            }
            Event::Scalar(s, _, anchor, _) => {
                let one = Expanded {
                    nodes: 1,
                    scalar_bytes: s.len() as u64,
                };
                size.add(one, here)?;
                let role = node_role(&mut stack, Some(&s), here);
                if anchor > 0 {
                    anchors.insert(anchor, (role.as_ref().map(|(p, _)| p.clone()), one));
                }
                if let Some((p, key)) = role {
                    record(&mut out, p, NodePos { key, value: here })?;
                }
            }
            Event::Alias(id) => {
                let role = node_role(&mut stack, None, here);
                if let Some((src, expanded)) = anchors.get(&id) {
                    size.add(*expanded, here)?;
                    if let (Some((p, _)), Some(src)) = (&role, src) {
                        out.aliases.insert(p.clone(), src.clone());
                    }
                }
                if let Some((p, key)) = role {
                    record(&mut out, p, NodePos { key, value: here })?;
                }
            }
            Event::MappingStart(anchor, _) | Event::SequenceStart(anchor, _) => {
                let is_map = matches!(ev, Event::MappingStart(..));
                if stack.len() >= limits::DEPTH {
                    return Err(limit_hit(here, "levels of nesting", limits::DEPTH));
                }
                let start = size;
                size.add(
                    Expanded {
                        nodes: 1,
                        scalar_bytes: 0,
                    },
                    here,
                )?;
                match node_role(&mut stack, None, here) {
                    Some((p, key)) => {
                        record(&mut out, p.clone(), NodePos { key, value: here })?;
                        open.push((anchor, Some(p.clone()), start));
                        stack.push(if is_map {
                            Frame::Map { path: p, key: None }
                        } else {
                            Frame::Seq { path: p, next: 0 }
                        });
                    }
                    None => {
                        open.push((anchor, None, start));
                        stack.push(Frame::Ignore);
                    }
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                if let Some((anchor, p, start)) = open.pop()
                    && anchor > 0
                {
                    anchors.insert(anchor, (p, size.since(start)));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
